"""Driver memory of a fit: dnnad's driver peak RSS fitting N normal vectors, against a plain single process doing
the fit's unavoidable work in the same run (read the vectors, build a flat FAISS index, leave-one-out k-NN of
every normal row, threshold, save vectors and ids).

    python benchmarks/fit_memory.py --normal 100000 --dim 512

The driver must hold the normal vectors (the index is built from them, then broadcast); this measures what it
holds beyond them. Both sides run as their own processes, with peak RSS sampled every 0.1 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, git_rev, machine, write_results
from scale import write_vectors

BASELINE = """
import sys, time
import faiss, numpy as np, pyarrow as pa, pyarrow.parquet as pq
normal, out, k = sys.argv[1], sys.argv[2], 2
t = pq.read_table(normal)
X = t["vec"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).astype(np.float32)
ids = t["id"]
del t
index = faiss.IndexFlatL2(X.shape[1])
index.add(X)
D, _ = index.search(X, k + 1)
scores = np.sqrt(np.maximum(D[:, 1:], 0)).mean(1)
threshold = float(np.quantile(scores, 0.95))
np.save(out + "/vectors.npy", X)
pq.write_table(pa.table({"id": ids}), out + "/normal.parquet")
"""


def peak_rss(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak private RSS, peak RSS in shared memory) of one process, in MiB. Shared memory is Ray's
    object store as far as the process touched it: counted once machine-wide, and spilled when it is full."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def watch():
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
                   if k in ("RssAnon", "RssFile", "RssShmem")}
            peak[0] = max(peak[0], kib.get("RssAnon", 0) + kib.get("RssFile", 0))
            peak[1] = max(peak[1], kib.get("RssShmem", 0))
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    return time.perf_counter() - t0, peak[0] / 2**10, peak[1] / 2**10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--normal", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnnad-fitmem-"))
    normal, query = work / "normal.parquet", work / "query.parquet"
    write_vectors(normal, a.normal, a.dim, 1, "n")
    write_vectors(query, 100, a.dim, 7, "q")
    (work / "base").mkdir()
    base_s, base_rss, _ = peak_rss([sys.executable, "-c", BASELINE, str(normal), str(work / "base")])
    s, rss, shm = peak_rss([sys.executable, "-m", "dnnad.cli", "score", "--normal", str(normal), "--query",
                            str(query), "--out", str(work / "fit"), "--embedding-column", "vec", "--quiet"])
    data_mib = a.normal * a.dim * 4 / 2**20
    shutil.rmtree(work)  # this run's own temporary folder
    lines = [f"## Fit driver memory ({dt.date.today()}, commit {git_rev()})", "",
             f"- command: `python benchmarks/fit_memory.py --normal {a.normal} --dim {a.dim}`",
             f"- machine: {machine()}", f"- the normal vectors: {data_mib:,.0f} MiB (float32)", "",
             "| | peak private RSS | object-store pages mapped | wall |", "|---|---|---|---|",
             f"| plain process (read, flat index, leave-one-out k-NN, save) | {base_rss:,.0f} MiB | - | "
             f"{base_s:.1f} s |",
             f"| dnnad driver (fit + score 100 rows, Ray in-process) | {rss:,.0f} MiB | {shm:,.0f} MiB | {s:.1f} s |",
             "", f"dnnad / plain peak private RSS: {rss / base_rss:.2f}x"]
    write_results(f"fit-memory-{a.normal}x{a.dim}", lines)


if __name__ == "__main__":
    main()
