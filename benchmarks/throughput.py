"""Speed and memory of the Ray pipeline against plain single-process baselines, measured in one run.

    python benchmarks/throughput.py [--parts embed,knn,scale,e2e] [--scale-n 1000000]

Prints ratios (Ray / plain) so that the figures mean something on a noisy shared machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import DATASETS, ROOT, git_rev, machine


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cifar_bytes(n: int) -> pa.Table:
    t = pq.read_table(DATASETS["cifar10"], columns=["id", "image"])
    return t.slice(0, n)


def embed_bench(backbone: str, size: int, n: int, batch: int, threads: int, actors: int) -> list[str]:
    """Images/s, decode included: the Ray actor pool vs a plain torch loop with the same model and threads."""
    import ray
    import torch
    from dnnad.backbones import FeatureExtractor, get_spec, preprocess_fn
    from dnnad.decode import decode_image
    from dnnad.pipeline import embed, start_ray
    from dnnad.weights import resolve_weights

    from dnnad.config import EmbedConfig

    table = cifar_bytes(n)
    spec = get_spec(backbone, size)
    w = resolve_weights(spec, "imagenet")
    fe, prep = FeatureExtractor(spec, w.state_dict, device="cpu", threads=threads), preprocess_fn(spec)
    images = table["image"].to_pylist()

    def plain():
        out = []
        for i in range(0, n, batch):
            x = torch.stack([prep(decode_image(b)) for b in images[i:i + batch]])
            out.append(fe(x))
        return np.concatenate(out)

    plain()  # warm-up (first-call allocations), as the actors get theirs while starting
    ref, t_plain = timed(plain)
    start_ray(quiet=True)
    cfg = EmbedConfig(backbone, "imagenet", size, batch, "cpu", max(1, threads // actors), actors)
    wref = ray.put(w.state_dict)

    def run_ray(rows: pa.Table) -> float:
        ds = ray.data.from_arrow([rows.slice(i, 256) for i in range(0, rows.num_rows, 256)])
        got, t = timed(lambda: embed(ds, cfg, wref))
        assert got.count() == rows.num_rows
        return t

    run_ray(table.slice(0, batch))  # warm-up: worker processes and imports
    t_ray = run_ray(table)  # wall time, including the actor pool's start (model build) for this dataset
    t_ray2 = run_ray(pa.concat_tables([table, table]))
    steady = n / (t_ray2 - t_ray) if t_ray2 > t_ray else float("nan")  # differential: the start cost cancels
    return [f"| embed {backbone} @{size}px, {n} CIFAR-10 JPEGs, batch {batch}, {threads} threads "
            f"({actors} actor(s) on Ray), decode included "
            f"| {n / t_plain:.1f} img/s | {n / t_ray:.1f} img/s incl. actor start; {steady:.1f} img/s steady "
            f"({n} vs {2 * n} images) | **{t_plain / t_ray:.2f}x** incl. start; **{steady * t_plain / n:.2f}x** steady |"]


def knn_bench(n: int, d: int, nq: int, k: int) -> list[str]:
    """kNN queries/s: Ray scoring actors vs raw FAISS in one process vs scikit-learn NearestNeighbors."""
    import faiss
    import ray
    from dnnad.index import build_index
    from dnnad.pipeline import Broadcast, knn_map, start_ray
    from ray.data.extensions import ArrowTensorArray
    from sklearn.neighbors import NearestNeighbors

    from dnnad.config import ScoreConfig

    rng = np.random.default_rng(0)
    Xb, Xq = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(nq, d)).astype(np.float32)
    (_, I_f), t_faiss = timed(lambda: faiss.knn(Xq, Xb, k))
    nn = NearestNeighbors(n_neighbors=k).fit(Xb)
    (_, I_sk), t_sk = timed(lambda: nn.kneighbors(Xq))
    index = build_index(Xb, 2)
    start_ray(quiet=True)
    bc = Broadcast([ray.put(s) for s in index.shards], ray.put(np.arange(n).astype(str).astype(object)))
    table = pa.table({"id": pa.array(np.arange(nq).astype(str)), "embedding": ArrowTensorArray.from_numpy(Xq),
                      "status": pa.array(["ok"] * nq), "error": pa.nulls(nq, pa.string())})
    ds = ray.data.from_arrow([table.slice(i, 2500) for i in range(0, nq, 2500)]).materialize()
    cfg = ScoreConfig(k=k, batch_size=2500)
    knn_map(ds.limit(10), bc.shards, bc.ids, k, None, cfg).materialize()  # warm-up
    res, t_ray = timed(lambda: knn_map(ds, bc.shards, bc.ids, k, None, cfg).materialize())
    assert res.count() == nq
    agree = float((np.sort(I_f, 1) == np.sort(I_sk, 1)).mean())
    return [f"| kNN k={k}, {n:,} x {d} normal, {nq:,} queries: raw FAISS (1 process) | {nq / t_faiss:,.0f} q/s | "
            f"{nq / t_ray:,.0f} q/s (Ray actors, exact re-rank) | **{t_faiss / t_ray:.2f}x** |",
            f"| same, scikit-learn NearestNeighbors (PyOD/cleanlab path) | {nq / t_sk:,.0f} q/s | "
            f"{nq / t_ray:,.0f} q/s | **{t_sk / t_ray:.2f}x** (neighbour agreement FAISS/sklearn {agree:.4f}) |"]


def rss_of(pids) -> list[tuple[float, float]]:
    import psutil

    out = []
    for pid in pids:
        m = psutil.Process(pid).memory_full_info()
        out.append((m.rss / 2**20, m.uss / 2**20))
    return out


def scale_bench(n: int, d: int, nq: int, k: int, kinds: list[str]) -> list[str]:
    """Build time, query throughput and recall of flat / IVF / HNSW; actor memory with 1 and 2 actors."""
    import psutil
    import ray
    from dnnad.index import build_index
    from dnnad.knn_actor import KnnScorer
    from dnnad.pipeline import start_ray

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(1000, d)).astype(np.float32) * 3
    Xb = (centers[rng.integers(0, 1000, n)] + rng.normal(size=(n, d))).astype(np.float32)
    Xq = (centers[rng.integers(0, 1000, nq)] + rng.normal(size=(nq, d))).astype(np.float32)
    lines, truth = [], None
    for kind in kinds:
        t0 = time.perf_counter()
        index = build_index(Xb, 2, kind)
        t_build = time.perf_counter() - t0
        (_, found), t_q = timed(lambda idx=index: idx.search(Xq, k))
        truth = found if truth is None else truth
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        lines.append(f"| {kind} index, {n:,} x {d}: build {t_build:.1f}s | {nq / t_q:,.0f} q/s "
                     f"| recall@{k} {recall:.4f} vs flat | |")
    start_ray(quiet=True)
    flat = build_index(Xb, 2)
    shard_refs = [ray.put(s) for s in flat.shards]
    ids_ref = ray.put(np.arange(n).astype(str).astype(object))
    driver = psutil.Process().memory_info().rss / 2**20
    remote = ray.remote(num_cpus=0)(KnnScorer)
    for n_actors in (1, 2):
        actors = [remote.remote(shard_refs, ids_ref, k, None) for _ in range(n_actors)]
        # Each actor searches once, touching every page of the index, before its memory is read.
        pids = ray.get([a.__ray_call__.remote(lambda self, q=Xq[:10]: (self.index.search(q, k), os.getpid())[1])
                        for a in actors])
        mem = rss_of(pids)
        lines.append(f"| {n_actors} scoring actor(s) holding the {Xb.nbytes / 2**20:,.0f} MiB flat index | "
                     + ", ".join(f"RSS {r:,.0f} MiB / private (USS) {u:,.0f} MiB" for r, u in mem)
                     + f" | driver RSS {driver:,.0f} MiB | |")
        for a in actors:
            ray.kill(a)
    return lines


def e2e_bench(backbone: str, size: int) -> list[str]:
    """Wall time of the CIFAR-10 one-class job for one class: 5,000 normal, 10,000 queries."""
    import subprocess
    import sys
    import tempfile

    out = tempfile.mkdtemp()
    cmd = [sys.executable, str(ROOT / "jobs" / "score.py"), "--normal", str(DATASETS["cifar10"]),
           "--normal-filter", "split=train", "--normal-filter", "label=0", "--query", str(DATASETS["cifar10"]),
           "--query-filter", "split=test", "--out", out, "--overwrite", "--backbone", backbone,
           "--image-size", str(size), "--quiet"]
    _, t = timed(lambda: subprocess.run(cmd, check=True))
    from sklearn.metrics import roc_auc_score

    s = pq.read_table(os.path.join(out, "scores"))
    auc = roc_auc_score((s["label"].to_numpy() != 0).astype(int), s["score"].to_numpy())
    return [f"| end-to-end `jobs/score.py`, CIFAR-10 airplane: 5,000 normal + 10,000 queries, {backbone} @{size}px "
            f"(process start to exit) | {t:.0f} s | ROC AUC {auc:.4f} | |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="embed,knn,scale,e2e")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--embed-n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, in total")
    ap.add_argument("--actors", type=int, default=1, help="embedding actors sharing those threads")
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--scale-queries", type=int, default=1000)
    ap.add_argument("--scale-kinds", default="flat,ivf,hnsw", help="index kinds timed at scale (flat first)")
    a = ap.parse_args()
    parts = a.parts.split(",")
    lines = [f"## Throughput ({dt.date.today()}, commit {git_rev()})", "",
             f"- command: `python benchmarks/throughput.py --parts {a.parts} --backbone {a.backbone} "
             f"--embed-n {a.embed_n} --scale-n {a.scale_n} --scale-kinds {a.scale_kinds}`",
             f"- machine: {machine()}", "",
             "| measurement | plain baseline | dnnad on Ray | ratio |", "|---|---|---|---|"]
    if "embed" in parts:
        for size, n in ((32, a.embed_n * 8), (224, a.embed_n)):  # more images where each is cheap
            lines += embed_bench(a.backbone, size, n, 64, a.threads, a.actors)
            print(lines[-1], flush=True)
    if "knn" in parts:
        lines += knn_bench(50_000, 512, 10_000, 2)
        print("\n".join(lines[-2:]), flush=True)
    if "scale" in parts:
        lines += scale_bench(a.scale_n, 512, a.scale_queries, 2, a.scale_kinds.split(","))
        print("\n".join(lines[-5:]), flush=True)
    if "e2e" in parts:
        lines += e2e_bench(a.backbone, 32)
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"throughput-{a.parts.replace(',', '-')}-{a.scale_n}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
