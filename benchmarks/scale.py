"""Scaling curve of the streaming query path (issue 11): rows/s, driver peak RSS and object-store peak against
the number of query rows, with a plain single-process baseline (the same FAISS search and Parquet write) in the
same run.

    python benchmarks/scale.py --sizes 10000 100000 1000000 --normal 20000 --dim 512 [--s3]

The object-store peak is the high-water mark of shared memory (/dev/shm, where Ray's in-process object store
lives on Linux; pages it touched stay counted) during the run, so nothing else may use /dev/shm meanwhile.

Vectors come from an ``--embedding-column`` source (no backbone), so the curve measures the pipeline itself.
dnnad runs with a model fitted beforehand (``--model``), so both sides do only the query path; dnnad's time
includes starting Ray in-process. ``--s3`` repeats the largest size writing to a local S3 server (moto).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import ROOT, git_rev, machine, write_results


def vectors(n: int, dim: int, seed: int, prefix: str) -> pa.Table:
    X = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return pa.table({"id": pa.array([f"{prefix}{i:09d}" for i in range(n)]),
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim)})


def write_vectors(path: Path, n: int, dim: int, seed: int, prefix: str, chunk: int = 100_000) -> None:
    with pq.ParquetWriter(path, vectors(1, dim, 0, prefix).schema) as w:
        for i in range(0, n, chunk):
            t = vectors(min(chunk, n - i), dim, seed + i, prefix)
            w.write_table(t.set_column(0, "id", pa.array([f"{prefix}{j:09d}" for j in range(i, i + t.num_rows)])))


def baseline(normal: Path, query: Path, out: Path, model: Path, k: int = 2, batch: int = 8192) -> float:
    """One process: read the query in batches, faiss.knn against the normal vectors, and write the same output
    columns dnnad writes (score, flag, normal percentile, neighbour ids and distances, status, error), built
    with vectorised Arrow calls."""
    import faiss

    t0 = time.perf_counter()
    nt = pq.read_table(normal)
    Xn = nt["vec"].combine_chunks().flatten().to_numpy().reshape(nt.num_rows, -1)
    names = nt["id"].combine_chunks()
    threshold = json.loads((model / "model.json").read_text())["threshold"]
    calib = np.sort(np.load(model / "calibration.npy"))
    writer = None
    for b in pq.ParquetFile(query).iter_batches(batch_size=batch):
        Xq = b.column(1).flatten().to_numpy(zero_copy_only=False).reshape(b.num_rows, -1)
        D, I = faiss.knn(Xq, Xn, k)
        dist = np.sqrt(np.maximum(D, 0)).astype(np.float64)
        score = dist.mean(1)
        offsets = pa.array(np.arange(0, k * b.num_rows + 1, k, dtype=np.int32))
        t = pa.table({"id": b.column(0), "score": score, "is_anomaly": score > threshold,
                      "normal_percentile": 100.0 * np.searchsorted(calib, score) / len(calib),
                      "neighbor_ids": pa.ListArray.from_arrays(offsets, names.take(pa.array(I.ravel()))),
                      "neighbor_dists": pa.ListArray.from_arrays(offsets, pa.array(dist.ravel())),
                      "status": pa.array(["ok"] * b.num_rows), "error": pa.nulls(b.num_rows, pa.string())})
        writer = writer or pq.ParquetWriter(out, t.schema)
        writer.write_table(t)
    writer.close()
    return time.perf_counter() - t0


def shm_used() -> int:
    return shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0


def run_dnnad(args: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(seconds, driver peak RSS in MiB, object-store peak in MiB) of one dnnad run as its own process."""
    import psutil

    shm0 = shm_used()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dnnad.cli", *args, "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, shm_peak = [0], [0]

    def watch():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            shm_peak[0] = max(shm_peak[0], shm_used() - shm0)
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.1)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    return seconds, peak[0] / 2**20, shm_peak[0] / 2**20


def moto(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--normal", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--s3", action="store_true", help="also write the --s3-size run to a local S3 server")
    ap.add_argument("--s3-size", type=int, default=100_000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnnad-scale-"))
    normal = work / "normal.parquet"
    write_vectors(normal, a.normal, a.dim, 1, "n")
    model = work / "model"
    common = ["--embedding-column", "vec"]
    run_dnnad(["score", "--normal", str(normal), "--query", str(normal), "--out", str(work / "fit"),
               "--model", str(model), *common])
    rows, s3_row = [], None
    for n in a.sizes:
        query = work / f"query-{n}.parquet"
        write_vectors(query, n, a.dim, 7, "q")
        base_s = baseline(normal, query, work / f"base-{n}.parquet", model)
        s, rss, shm = run_dnnad(["score", "--model", str(model), "--query", str(query), "--out", str(work / f"out-{n}"),
                            *common])
        rows.append({"rows": n, "baseline_s": base_s, "dnnad_s": s, "baseline_rows_per_s": n / base_s,
                     "dnnad_rows_per_s": n / s, "ratio": base_s / s, "driver_peak_rss_mib": rss,
                     "object_store_peak_mib": shm})
        print(json.dumps(rows[-1]), flush=True)
    if a.s3:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = moto(port)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
        try:
            import pyarrow.fs as pafs

            time.sleep(3)
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="x", secret_key="x",
                              region="us-east-1", allow_bucket_creation=True).create_dir("bench")
            n = a.s3_size
            if not (work / f"query-{n}.parquet").exists():
                write_vectors(work / f"query-{n}.parquet", n, a.dim, 7, "q")
            s3_s, rss, _ = run_dnnad(["score", "--model", str(model), "--query", str(work / f"query-{n}.parquet"),
                                   "--out", f"s3://bench/out?endpoint_override=127.0.0.1:{port}&scheme=http", *common],
                                  env)
            local = next((r["dnnad_s"] for r in rows if r["rows"] == n), None) or run_dnnad(
                ["score", "--model", str(model), "--query", str(work / f"query-{n}.parquet"), "--out",
                 str(work / "out-local"), *common])[0]
            s3_row = {"rows": n, "s3_s": s3_s, "local_s": local, "s3_vs_local": local / s3_s,
                      "driver_peak_rss_mib": rss}
            print(json.dumps(s3_row), flush=True)
        finally:
            server.terminate()
            server.wait()
    shutil.rmtree(work)  # this run's own temporary folder
    lines = [f"## Scaling curve ({dt.date.today()}, commit {git_rev()})", "",
             f"- command: `python benchmarks/scale.py --sizes {' '.join(map(str, a.sizes))} --normal {a.normal} "
             f"--dim {a.dim}{' --s3 --s3-size ' + str(a.s3_size) if a.s3 else ''}`", f"- machine: {machine()}", "",
             "| query rows | baseline rows/s | dnnad rows/s | dnnad / baseline | driver peak RSS | object-store peak |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']:,} | {r['baseline_rows_per_s']:,.0f} | {r['dnnad_rows_per_s']:,.0f} | "
                     f"{r['ratio']:.2f}x | {r['driver_peak_rss_mib']:.0f} MiB | {r['object_store_peak_mib']:.0f} MiB |")
    if len(rows) > 1:
        top = rows[-1]["dnnad_rows_per_s"]
        lines += ["", "dnnad rows/s as a fraction of the largest size's: " + ", ".join(
            f"{r['rows']:,}: {r['dnnad_rows_per_s'] / top:.2f}" for r in rows)]
    if s3_row:
        lines += ["", f"{s3_row['rows']:,} rows to a local S3 server (moto) vs local disk: {s3_row['s3_s']:.1f} s vs "
                  f"{s3_row['local_s']:.1f} s ({s3_row['s3_vs_local']:.2f}x), driver peak RSS "
                  f"{s3_row['driver_peak_rss_mib']:.0f} MiB"]
    write_results(f"scale-{a.normal}-{max(a.sizes)}", lines)

if __name__ == "__main__":
    main()
