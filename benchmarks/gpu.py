"""GPU figures in one command (run on a machine with a CUDA GPU and faiss-gpu):

    python benchmarks/gpu.py [--n 1000000] [--queries 100000] [--backbone efficientnet_lite0]

kNN: raw ``faiss.knn_gpu`` vs dnnad's exact sharded search on the GPU (1 and 4 shards) and vs CPU FAISS;
embedding: a plain fp16 torch loop vs the Ray embedding stage on the GPU (steady and with start).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import git_rev, machine


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def knn(n: int, d: int, nq: int, k: int, batch: int) -> list[str]:
    import faiss

    from dnnad.core.index import ShardedIndex, build_index

    rng = np.random.default_rng(0)
    Xb, Xq = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(nq, d)).astype(np.float32)
    res = faiss.StandardGpuResources()
    faiss.knn_gpu(res, Xq[:batch], Xb, k)  # warm-up
    _, t_raw = timed(lambda: [faiss.knn_gpu(res, Xq[i:i + batch], Xb, k) for i in range(0, nq, batch)])
    lines = [f"| raw faiss.knn_gpu, {n:,} x {d}, {nq:,} queries, k={k} | {nq / t_raw:,.0f} q/s | | |"]
    for shards in (1, 4):
        index = ShardedIndex(build_index(Xb, shards).shards, device="cuda")
        index.search(Xq[:batch], k)
        _, t = timed(lambda idx=index: [idx.search(Xq[i:i + batch], k) for i in range(0, nq, batch)])
        lines.append(f"| dnnad exact search on the GPU, {shards} shard(s) | {nq / t_raw:,.0f} q/s raw | "
                     f"{nq / t:,.0f} q/s | **{t_raw / t:.2f}x** |")
    cpu_n = min(nq, 10_000)
    _, t_cpu = timed(lambda: faiss.knn(Xq[:cpu_n], Xb, k))
    lines.append(f"| CPU faiss.knn ({os.cpu_count()} cores), same index | {cpu_n / t_cpu:,.0f} q/s | "
                 f"GPU dnnad above | **{(nq / t) / (cpu_n / t_cpu):.1f}x** GPU/CPU |")
    return lines


def embed(backbone: str, size: int, n: int, batch: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch
    from common import DATASETS

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.runtime import start_ray
    from dnnad.stages.embed import embed as embed_stage
    from dnnad.vision.backbones import FeatureExtractor, preprocess_fn
    from dnnad.vision.decode import decode_image
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    table = pq.read_table(DATASETS["cifar10"], columns=["id", "image"])
    table = pa.concat_tables([table] * -(-n // table.num_rows)).slice(0, n)
    spec = get_spec(backbone, size)
    w = resolve_weights(spec, "imagenet")
    fe, prep = FeatureExtractor(spec, w.state_dict, device="cuda"), preprocess_fn(spec)
    x = torch.stack([prep(decode_image(b)) for b in table["image"].to_pylist()[:batch]])
    fe(x)
    torch.cuda.synchronize()
    _, t_fwd = timed(lambda: [fe(x) for _ in range(10)])
    images = table["image"].to_pylist()
    _, t_plain = timed(lambda: [fe(torch.stack([prep(decode_image(b)) for b in images[i:i + batch]]))
                                for i in range(0, n, batch)])
    start_ray(quiet=True)
    wref = ray.put(w.state_dict)
    cfg = EmbedConfig(backbone, "imagenet", size, batch, "cuda")

    def run(rows):
        ds = ray.data.from_arrow([rows.slice(i, 1024) for i in range(0, rows.num_rows, 1024)])
        return timed(lambda: embed_stage(ds, cfg, wref, DEFAULT_MAX_FILE_BYTES).materialize())[1]

    run(table.slice(0, batch))
    t1, t2 = run(table), run(pa.concat_tables([table, table]))
    steady = n / (t2 - t1)
    return [f"| embed {backbone} @{size}px fp16 channels_last, {n:,} images: model alone "
            f"{10 * batch / t_fwd:,.0f} img/s | plain loop {n / t_plain:,.0f} img/s | {n / t1:,.0f} img/s incl. "
            f"start; {steady:,.0f} img/s steady | **{t_plain / t1:.2f}x** incl. start; "
            f"**{steady * t_plain / n:.2f}x** steady; {steady / (10 * batch / t_fwd):.2f} of the model alone |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--embed-n", type=int, default=20_000)
    a = ap.parse_args()
    lines = [f"## GPU (commit {git_rev()}); machine: {machine()}", "",
             "| measurement | baseline | dnnad | ratio |", "|---|---|---|---|"]
    lines += knn(a.n, 512, a.queries, 2, 4096)
    print("\n".join(lines), flush=True)
    for size in (32, 224):
        lines += embed(a.backbone, size, a.embed_n, 256)
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
