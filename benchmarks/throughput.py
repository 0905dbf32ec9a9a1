"""Speed and memory of the Ray pipeline against plain single-process baselines, measured in one run.

    python benchmarks/throughput.py [--parts embed,knn,shards,scale,cli] [--scale-n 1000000]

Prints ratios (dnnad on Ray / plain baseline with the same threads) so that the figures mean something on a
noisy shared machine, and writes the table to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
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


RUNTIME_NAMES = ("torch", "onnxruntime", "openvino")


def forward_runners(spec, state: dict, threads: int, calib: np.ndarray) -> dict:
    """Forward pass only, ``(n, 3, H, W) float32 → (n, d)``, per runtime and precision. fp32 ones must give
    the torch embedding; bf16 (OpenVINO's own CPU default where the CPU has it) and int8 (ONNX Runtime static
    QDQ, per channel, calibrated on ``calib``) are the lower precisions, measured, not defaults."""
    import openvino as ov
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from dnnad.vision.backbones import FeatureExtractor
    from dnnad.vision.onnx_session import OnnxTaps
    from dnnad.vision.runtimes import export_onnx

    torch.set_num_threads(threads)
    onnx = export_onnx(spec, state)
    eager = FeatureExtractor(spec, state, device="cpu", threads=threads)
    last = FeatureExtractor(spec, state, device="cpu", threads=threads)
    last.model = last.model.to(memory_format=torch.channels_last)

    def channels_last(x):
        with torch.inference_mode():
            return last.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    core = ov.Core()

    def openvino(hint: str):
        net = core.compile_model(core.read_model(onnx), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                  "INFERENCE_NUM_THREADS": threads,
                                                                  "PERFORMANCE_HINT": "LATENCY"})
        return lambda x: net(x)[0]

    class Calib(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"pixels": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        (src := os.path.join(tmp, "fp32.onnx"), dst := os.path.join(tmp, "int8.onnx"))
        with open(src, "wb") as f:
            f.write(onnx)
        quant_pre_process(src, src, skip_symbolic_shape=True)  # shapes and folding, as ONNX Runtime advises
        quantize_static(src, dst, Calib(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        with open(dst, "rb") as f:
            int8 = OnnxTaps(f.read(), threads)
    fp32 = OnnxTaps(onnx, threads)
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"torch eager, NCHW fp32": lambda x: eager(x), "torch eager, channels_last fp32": channels_last,
            "ONNX Runtime fp32": lambda x: fp32(x)["final"], "OpenVINO fp32": openvino("f32"),
            **({"OpenVINO bf16": openvino("bf16")} if bf16 else {}),
            "ONNX Runtime int8 (static QDQ)": lambda x: int8(x)["final"]}


def flops_per_image(spec, state: dict) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dnnad.vision.backbones import FeatureExtractor

    fe = FeatureExtractor(spec, state, device="cpu")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fe.model(torch.zeros(1, 3, spec.image_size, spec.image_size))
    return float(counter.get_total_flops())


def sgemm_peak(threads: int) -> float:
    """GFLOP/s of a large float32 matrix product with ``threads`` threads: the cores' practical peak."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    (_, t) = timed(lambda: [a @ b for _ in range(5)])
    return 5 * 2 * 2048 ** 3 / t / 1e9


def filtered_parquet(path: str, images: list[bytes], n: int) -> None:
    """``n`` selected images (``keep = 1``) interleaved with as many others, in row groups of 1,000: the
    filtered Parquet source of a corpus run."""
    picked = (images * -(-2 * n // len(images)))[:2 * n]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(2 * n)], "image": picked,
                             "keep": pa.array([i % 2 for i in range(2 * n)], pa.int8())}), path, row_group_size=1000)


def embed_bench(backbone: str, size: int, n: int, threads: int, batch: int = 64) -> list[str]:
    """Forward pass alone per runtime and precision (images/s, per core, GFLOP/s against the cores' sgemm
    peak, max relative difference from torch), then the job's embed stage per runtime over a filtered Parquet
    source against a plain single-process loop that decodes, crops and runs the same runtime."""
    import ray
    from PIL import Image

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig, SourceConfig
    from dnnad.runtime import start_ray, stop_ray
    from dnnad.sources import prepare_source
    from dnnad.stages.embed import CPU_FORWARD_PIXELS, Embedder, embed
    from dnnad.stages.read import read_source
    from dnnad.vision.decode import decode_image
    from dnnad.vision.preprocess import normalize_batch
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    table = pq.read_table(DATASETS["cifar10"], columns=["id", "image", "split"])
    images = table.filter(pa.compute.equal(table["split"], "test"))["image"].to_pylist()
    spec = get_spec(backbone, size)
    w = resolve_weights(spec, "imagenet")
    probe = Embedder(spec, w.state_dict, device="cpu", threads=threads, runtime="torch")

    def pixels(chunk: list[bytes]) -> np.ndarray:
        return normalize_batch(spec, np.stack([probe.crop(decode_image(b)) for b in chunk]))

    x = pixels(images[:batch])
    runners = forward_runners(spec, w.state_dict, threads, pixels(images[batch:batch + 256]))
    gflop = flops_per_image(spec, w.state_dict) / 1e9
    peak = sgemm_peak(threads)
    ref = runners["torch eager, NCHW fp32"](x)
    reps = max(2, int(2000 / (size / 32) ** 2 // batch))
    lines, fwd = [], {}
    chunk = max(1, min(batch, CPU_FORWARD_PIXELS // size ** 2))  # as the actors run the exported runtimes

    def chunked(run):
        return lambda x: np.concatenate([np.asarray(run(x[i:i + chunk])) for i in range(0, len(x), chunk)])

    runners = {name: run if name.startswith("torch") else chunked(run) for name, run in runners.items()}
    for name, run in runners.items():
        try:
            out = run(x)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot run this network is a row of the table
            lines.append(f"| forward only: {backbone} @{size}px, {name} | — | fails: {str(e)[:160]} | — |")
            print(lines[-1], flush=True)
            continue
        _, t = timed(lambda run=run: [run(x) for _ in range(reps)])
        rate = reps * batch / t
        fwd[name] = rate
        diff = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
        lines.append(f"| forward only: {backbone} @{size}px, batch {batch if name.startswith('torch') else chunk}, "
                     f"{threads} threads, {name} | — | "
                     f"{rate:.1f} img/s ({rate / threads:.1f} per core), {rate * gflop:.0f} GFLOP/s = "
                     f"{100 * rate * gflop / peak:.0f} % of the {peak:.0f} GFLOP/s sgemm peak; max rel diff "
                     f"{diff:.1e} | {rate / fwd['torch eager, NCHW fp32']:.2f}x torch eager |")
        print(lines[-1], flush=True)

    plain_of = {"torch": "torch eager, NCHW fp32", "onnxruntime": "ONNX Runtime fp32", "openvino": "OpenVINO fp32"}
    todays = None
    with tempfile.TemporaryDirectory() as tmp:
        paths = {1: os.path.join(tmp, "warm.parquet"), 2: os.path.join(tmp, "run.parquet")}
        filtered_parquet(paths[1], images, 256)
        filtered_parquet(paths[2], images, n)
        owned = start_ray(quiet=True)
        try:
            kept = images[:n]
            for runtime in RUNTIME_NAMES:
                forward = runners[plain_of[runtime]]

                def plain_loop(forward=forward) -> None:  # PIL decode, the crop, one batch at a time
                    for i in range(0, n, batch):
                        crops = [probe.crop(Image.open(io.BytesIO(b)).convert("RGB")) for b in kept[i:i + batch]]
                        forward(normalize_batch(spec, np.stack(crops)))

                _, t_plain = timed(plain_loop)
                cfg = EmbedConfig(backbone, "imagenet", size, batch, "cpu", runtime=runtime)
                wref = ray.put(w.state_dict)

                def stage(path: str, cfg=cfg, wref=wref) -> tuple[float, float]:
                    """(images/s from the call, actor start included; images/s over the last three quarters of
                    the rows, once every actor has started)."""
                    src = prepare_source(SourceConfig(path, filters=(("keep", "1"),)), "query")
                    t0, rows, quarter = time.perf_counter(), 0, None
                    for b in embed(read_source(src), cfg, wref, DEFAULT_MAX_FILE_BYTES).iter_batches(batch_size=None):
                        rows += len(b["id"])
                        if quarter is None and rows >= src.rows / 4:
                            quarter, t_quarter = rows, time.perf_counter()
                    t_end = time.perf_counter()
                    assert rows == src.rows
                    return rows / (t_end - t0), (rows - quarter) / max(t_end - t_quarter, 1e-9)

                stage(paths[1])  # warm-up: worker processes, imports, the export
                with_start, steady = stage(paths[2])
                todays = todays or steady
                lines.append(
                    f"| job embed stage, {runtime}: {backbone} @{size}px, Parquet source filtered to {n:,} of "
                    f"{2 * n:,} CIFAR-10 JPEGs (decode included) | plain loop, same runtime, {threads} threads: "
                    f"{n / t_plain:.1f} img/s | {with_start:.1f} img/s incl. actor start; {steady:.1f} img/s once "
                    f"started (last 3/4 of the rows) | "
                    f"**{steady / (n / t_plain):.2f}x** the plain loop; {steady / fwd[plain_of[runtime]]:.2f}x its "
                    f"forward pass alone; {steady / todays:.2f}x the torch stage |")
                print(lines[-1], flush=True)
        finally:
            if owned:
                stop_ray()
    return lines


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
    ap.add_argument("--embed-n32", type=int, default=5_000, help="Lite0 images at 32 px (0: skip)")
    ap.add_argument("--embed-n260", type=int, default=512, help="Lite2 images at 260 px (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the plain baselines")
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
             f"--embed-n260 {a.embed_n260} --knn-n {a.knn_n} --knn-queries {a.knn_queries} "
             f"--shard-queries {a.shard_queries} --scale-n {a.scale_n} --scale-kinds {a.scale_kinds}`",
             f"- machine: {machine()}", "",
             "| measurement | plain baseline | dnnad on Ray | ratio |", "|---|---|---|---|"]
    if "embed" in parts:
        for backbone, size, n in (("efficientnet_lite0", 32, a.embed_n32), ("efficientnet_lite2", 260, a.embed_n260)):
            if n:
                lines += embed_bench(backbone, size, n, a.threads)
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
