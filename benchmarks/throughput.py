"""Speed and memory of the Ray pipeline against plain single-process baselines, measured in one run.

    python benchmarks/throughput.py [--parts embed,knn,shards,scale,cli] [--scale-n 1000000]

Prints ratios (dnnad on Ray / plain baseline with the same threads) so that the figures mean something on a
noisy shared machine, and writes the table to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import DATASETS, git_rev, machine, write_results


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def embed_bench(backbone: str, size: int, n: int, batch: int, threads: int, actors: int | None = None
                ) -> list[str]:
    """Images/s, decode included: the Ray embedding stage vs a plain torch loop (torchvision transforms per
    image, same model, ``threads`` torch threads); per-image time outside the forward pass for both. The Ray
    stage splits the same threads over ``actors`` actors (default: dnnad's own plan for this machine)."""
    import ray
    import torch

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.runtime import start_ray
    from dnnad.stages.embed import embed
    from dnnad.stages.read import ROWS_PER_BLOCK  # blocks as the read stage makes them
    from dnnad.vision.backbones import FeatureExtractor, preprocess_fn
    from dnnad.vision.decode import decode_image
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    table = pq.read_table(DATASETS["cifar10"], columns=["id", "image"])
    table = pa.concat_tables([table] * -(-n // table.num_rows)).slice(0, n)
    spec = get_spec(backbone, size)
    w = resolve_weights(spec, "imagenet")
    prep = preprocess_fn(spec)
    images = table["image"].to_pylist()

    def plain(n_threads: int) -> tuple[float, float]:
        """(seconds, forward seconds per image) of a plain loop with ``n_threads`` torch threads."""
        fe = FeatureExtractor(spec, w.state_dict, device="cpu", threads=n_threads)
        torch.set_num_threads(n_threads)
        forward = 0.0
        for _rep in range(2):  # the first pass warms up (first-call allocations), as the actors do while starting
            forward, t0 = 0.0, time.perf_counter()
            for i in range(0, n, batch):
                x = torch.stack([prep(decode_image(b)) for b in images[i:i + batch]])
                _, t = timed(lambda x=x: fe(x))
                forward += t
        return time.perf_counter() - t0, forward / n

    t_plain, t_fwd = plain(threads)
    t_one, t_fwd1 = plain(1)  # one plain loop per core would run at threads x this rate
    best = max(n / t_plain, threads * n / t_one)
    start_ray(quiet=True)
    from dnnad.runtime import cluster_resources, embed_pool

    actors = actors or embed_pool(cluster_resources()[0], None, None)[0]
    ray_threads = max(1, threads // actors)
    cfg = EmbedConfig(backbone, "imagenet", size, batch, "cpu", ray_threads, actors)
    wref = ray.put(w.state_dict)

    def run_ray(rows: pa.Table) -> float:
        ds = ray.data.from_arrow([rows.slice(i, ROWS_PER_BLOCK) for i in range(0, rows.num_rows, ROWS_PER_BLOCK)])
        got, t = timed(lambda: embed(ds, cfg, wref, DEFAULT_MAX_FILE_BYTES).materialize())
        assert got.count() == rows.num_rows
        return t

    run_ray(table.slice(0, batch))  # warm-up: worker processes and imports
    t_ray = run_ray(table)  # wall time, including the actor pool's start (model build) for this dataset
    t_ray2 = run_ray(pa.concat_tables([table, table]))
    steady = n / (t_ray2 - t_ray) if t_ray2 > t_ray else float("nan")  # differential: the start cost cancels
    fwd_actor = t_fwd1 if ray_threads == 1 else t_fwd
    return [f"| embed {backbone} @{size}px, {n:,} CIFAR-10 JPEGs, batch {batch}, {threads} cores, decode "
            f"included | plain loop: {n / t_plain:.1f} img/s with {threads} threads ({1e3 * (t_plain / n - t_fwd):.2f} "
            f"ms/img outside forward); {n / t_one:.1f} img/s with 1 thread ({1e3 * (t_one / n - t_fwd1):.2f} ms), "
            f"x{threads} = {threads * n / t_one:.1f} img/s; best {best:.1f} img/s "
            f"| {n / t_ray:.1f} img/s incl. actor start; {steady:.1f} img/s steady; "
            f"{1e3 * (actors / steady - fwd_actor):.2f} ms/img outside forward per actor "
            f"({actors} actor(s) x {ray_threads} thread(s)) "
            f"| **{n / t_ray / best:.2f}x** incl. start; **{steady / best:.2f}x** steady (of the best plain) |"]


def query_dataset(Xq: np.ndarray):

    from dnnad.stages.collect import as_dataset

    return as_dataset(np.arange(len(Xq)).astype(str).astype(object), Xq, max(1, len(Xq) // 10_000)).materialize()


def ray_score(shards: list, Xq_ds, n_ref: int, k: int, batch: int, groups: int = 1) -> float:
    """Seconds for the Ray scoring stage over ``Xq_ds`` (actor start included), output checked."""
    import ray

    from dnnad.config import ScoreConfig
    from dnnad.stages.score import Scorer

    scorer = Scorer([ray.put(s) for s in shards], ray.put(np.arange(n_ref).astype(str).astype(object)), k, None,
                    ScoreConfig(k=k, batch_size=batch, shard_groups=groups),
                    shard_rows=[len(s.vectors) for s in shards], shard_bytes=[s.memory_bytes for s in shards])
    res, t = timed(lambda: scorer.map(Xq_ds).materialize())
    assert res.count() == Xq_ds.count()
    return t


def knn_bench(n: int, d: int, nq: int, k: int, batch: int) -> list[str]:
    """kNN queries/s: the Ray scoring stage (exact re-rank) vs raw ``faiss.knn`` with the same threads."""
    import faiss

    from dnnad.core.index import build_index
    from dnnad.runtime import cluster_resources, score_pool, start_ray

    start_ray(quiet=True)
    actors, threads = score_pool(cluster_resources()[0], None)
    rng = np.random.default_rng(0)
    Xb, Xq = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(nq, d)).astype(np.float32)
    faiss.omp_set_num_threads(threads * actors)
    (_, I_f), t_faiss = timed(lambda: faiss.knn(Xq, Xb, k))
    t_ray = ray_score(build_index(Xb, 1).shards, query_dataset(Xq), n, k, batch)
    # Steady state: twice the queries minus once; the actor start cancels.
    t_ray2 = ray_score(build_index(Xb, 1).shards, query_dataset(np.concatenate([Xq, Xq])), n, k, batch)
    steady = nq / (t_ray2 - t_ray)
    return [f"| kNN k={k}, {n:,} x {d} normal, {nq:,} queries, {threads * actors} threads: raw `faiss.knn` "
            f"| {nq / t_faiss:,.0f} q/s | {nq / t_ray:,.0f} q/s incl. actor start; {steady:,.0f} q/s steady "
            f"({nq:,} vs {2 * nq:,} queries; Ray scoring stage, exact re-rank) "
            f"| **{t_faiss / t_ray:.2f}x** incl. start; **{steady * t_faiss / nq:.2f}x** steady |"]


def shards_bench(n: int, d: int, nq: int, k: int, batch: int, counts=(1, 2, 4, 8)) -> list[str]:
    """The same queries through the Ray scoring stage with 1, 2, 4, 8 shards: time must not grow."""
    from dnnad.core.index import build_index
    from dnnad.runtime import start_ray

    start_ray(quiet=True)
    rng = np.random.default_rng(2)
    Xb, Xq = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(nq, d)).astype(np.float32)
    ds = query_dataset(Xq)
    ray_score(build_index(Xb, 1).shards, ds.limit(batch), n, k, batch)  # warm-up
    times = {s: ray_score(build_index(Xb, s).shards, ds, n, k, batch) for s in counts}
    base = times[counts[0]]
    lines = [f"| {s} shard(s), {n:,} x {d} normal, {nq:,} queries (Ray scoring stage, one node) | "
             f"{nq / times[counts[0]]:,.0f} q/s with 1 shard | {nq / t:,.0f} q/s | **{base / t:.2f}x** of 1 shard |"
             for s, t in times.items()]
    for g in (2, 4):  # --shard-groups: each actor pool holds 1/g of the index
        t = ray_score(build_index(Xb, counts[-1]).shards, ds, n, k, batch, groups=g)
        lines.append(f"| {counts[-1]} shards in {g} shard groups (`--shard-groups {g}`: each actor holds "
                     f"{Xb.nbytes / g / 2**20:,.0f} of {Xb.nbytes / 2**20:,.0f} MiB), same queries | "
                     f"{nq / base:,.0f} q/s with 1 shard | {nq / t:,.0f} q/s | **{base / t:.2f}x** of 1 shard |")
    return lines


def scale_bench(n: int, d: int, nq: int, k: int, kinds: list[str]) -> list[str]:
    """Build time, q/s and recall@k vs exact of each index kind (2 shards, in one process), and the index
    memory a scoring actor holds (compressed kinds: codes only; their vectors are memory-mapped)."""
    import psutil

    from dnnad.core.index import ShardedIndex, build_shard, mapped_shard, shard_bounds
    from dnnad.core.settings import COMPRESSED_KINDS

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(1000, d)).astype(np.float32) * 3
    Xb = (centers[rng.integers(0, 1000, n)] + rng.normal(size=(n, d))).astype(np.float32)
    Xq = (centers[rng.integers(0, 1000, nq)] + rng.normal(size=(nq, d))).astype(np.float32)
    tmp = tempfile.mkdtemp()
    lines, truth = [], None
    for kind in ["flat"] + [k_ for k_ in kinds if k_ != "flat"]:
        t0 = time.perf_counter()
        shards = [build_shard(Xb[a:b], a, kind) for a, b in shard_bounds(n, 2)]
        t_build = time.perf_counter() - t0
        if kind in COMPRESSED_KINDS:  # as a loaded model holds them: vectors on disk, read on demand
            for i, s in enumerate(shards):
                np.save(f"{tmp}/{kind}-{i}.npy", s.vectors)
            shards = [mapped_shard(s.offset, f"{tmp}/{kind}-{i}.npy", s.faiss_bytes) for i, s in enumerate(shards)]
        rss0 = psutil.Process().memory_info().rss
        index = ShardedIndex(shards)
        (_, found), t_q = timed(lambda idx=index: idx.search(Xq, k))
        held = sum(s.faiss_bytes.nbytes if s.faiss_bytes is not None else 0 for s in shards)
        held += 0 if kind in COMPRESSED_KINDS else Xb.nbytes
        truth = found if truth is None else truth
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        lines.append(f"| {kind} index, {n:,} x {d}, 2 shards: build {t_build:.1f}s | {nq / t_q:,.0f} q/s "
                     f"| recall@{k} {recall:.4f} vs exact; index memory per actor {held / 2**20:,.0f} MiB "
                     f"(search process RSS +{(psutil.Process().memory_info().rss - rss0) / 2**20:,.0f} MiB) | |")
        print(lines[-1], flush=True)
        if kind in COMPRESSED_KINDS:  # --approximate: distances from the codes, vectors never read
            rss0 = psutil.Process().memory_info().rss
            (_, found), t_q = timed(lambda sh=shards: ShardedIndex(sh, exact=False).search(Xq, k))
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
            lines.append(f"| {kind} index `--approximate` (scored from the codes), {n:,} x {d}, 2 shards | "
                         f"{nq / t_q:,.0f} q/s | recall@{k} {recall:.4f} vs exact; index memory per actor "
                         f"{held / 2**20:,.0f} MiB (search process RSS +"
                         f"{(psutil.Process().memory_info().rss - rss0) / 2**20:,.0f} MiB) | |")
            print(lines[-1], flush=True)
        del index, shards
    return lines


def cli_bench(repeats: int = 5) -> list[str]:
    """The command line's latency (figures the tests do not assert): ``dnnad --help`` and a bad configuration's
    one-line error (a normal folder of one image, refused after listing it, before Ray), each in a fresh process
    (median of ``repeats``) against a bare ``python -c pass``; and ``JobConfig.validate()`` in process."""
    import statistics
    import subprocess
    import sys

    from common import ROOT
    from PIL import Image

    from dnnad.cli import config_from_args, explicit_settings, parser

    def median_s(argv: list[str], rc: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != rc:
                raise RuntimeError(f"{argv}: exit {p.returncode}, expected {rc}: {p.stderr[-2000:]}")
        return statistics.median(times)

    bare = median_s(["-c", "pass"], 0)
    help_s = median_s(["-m", "dnnad.cli", "--help"], 0)
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(f"{d}/one")
        Image.new("RGB", (32, 32), "red").save(f"{d}/one/a.png")
        bad_s = median_s(["-m", "dnnad.cli", "score", "--normal", f"{d}/one", "--query", f"{d}/one", "--out",
                          f"{d}/out", "--quiet"], 2)
    ap = parser()
    a = ap.parse_args(["score", "--query", "q", "--out", "o"])
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        config_from_args(a, explicit_settings(ap, a)).validate()
    validate_ms = (time.perf_counter() - t0) / n * 1000
    return [f"| `dnnad --help`, fresh process (median of {repeats}) | {bare:.2f} s (`python -c pass`) | "
            f"{help_s:.2f} s | {help_s / bare:.1f}x |",
            f"| bad configuration to its one-line error, fresh process (median of {repeats}) | {bare:.2f} s "
            f"(`python -c pass`) | {bad_s:.2f} s | {bad_s / bare:.1f}x |",
            f"| `JobConfig.validate()` in process (mean of {n}) | | {validate_ms:.2f} ms | |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="embed,knn,shards,scale", help="also: cli (the command line's latency)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--embed-n32", type=int, default=10_000, help="images at 32 px (0: skip)")
    ap.add_argument("--embed-n224", type=int, default=512, help="images at 224 px (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--embed-actors", type=int, default=None, help="Ray embedding actors (default: dnnad's plan)")
    ap.add_argument("--knn-n", type=int, default=20_000, help="normal rows of the kNN and shard measurements")
    ap.add_argument("--knn-queries", type=int, default=100_000)
    ap.add_argument("--shard-queries", type=int, default=100_000)
    ap.add_argument("--score-batch", type=int, default=4096)
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--scale-queries", type=int, default=1000)
    ap.add_argument("--scale-kinds", default="flat,ivf,hnsw,ivfpq,sq8")
    a = ap.parse_args()
    parts = a.parts.split(",")
    lines = [f"## Throughput ({dt.date.today()}, commit {git_rev()})", "",
             f"- command: `python benchmarks/throughput.py --parts {a.parts} --embed-n32 {a.embed_n32} "
             f"--embed-n224 {a.embed_n224} --knn-n {a.knn_n} --knn-queries {a.knn_queries} "
             f"--shard-queries {a.shard_queries} --scale-n {a.scale_n} --scale-kinds {a.scale_kinds}`",
             f"- machine: {machine()}", "",
             "| measurement | plain baseline | dnnad on Ray | ratio |", "|---|---|---|---|"]
    if "embed" in parts:
        for size, n in ((32, a.embed_n32), (224, a.embed_n224)):
            if not n:
                continue
            lines += embed_bench(a.backbone, size, n, 64, a.threads, a.embed_actors)
            print(lines[-1], flush=True)
    if "knn" in parts:
        lines += knn_bench(a.knn_n, 512, a.knn_queries, 2, a.score_batch)
        print(lines[-1], flush=True)
    if "shards" in parts:
        lines += shards_bench(a.knn_n, 512, a.shard_queries, 2, a.score_batch)
        print("\n".join(lines[-6:]), flush=True)
    if "scale" in parts:
        lines += scale_bench(a.scale_n, 512, a.scale_queries, 2, a.scale_kinds.split(","))
    if "cli" in parts:
        lines += cli_bench()
        print("\n".join(lines[-3:]), flush=True)
    write_results(f"throughput-{a.parts.replace(',', '-')}-{a.scale_n}", lines)


if __name__ == "__main__":
    main()
