"""Driver memory of a fit: dnnad's driver peak RSS fitting N normal vectors (the score job), or ranking N labelled
vectors (the rank job: whole-set leave-one-out search, duplicate check, per-label rankings, refit), against a
plain single process doing a fit's unavoidable work in the same run (read the vectors, build a flat FAISS index,
leave-one-out k-NN of every normal row, threshold, save vectors and ids).

    python benchmarks/fit_memory.py --normal 100000 --dim 512
    python benchmarks/fit_memory.py --job rank --normal 100000 --dim 1280 --labels 10

The driver keeps the collected vectors in disk arrays (``dnnad.core.arrays``): their pages are file-backed page
cache, which the kernel writes back and drops under pressure. So the table splits the driver's resident memory
into anonymous (heap: what the process needs) and file-backed (mapped files: the disk arrays and the libraries'
code). Both sides run as their own processes, with peak RSS sampled every 0.1 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import ROOT, git_rev, machine, write_results
from scale import write_vectors

BASELINE = """
import sys, time
import faiss, numpy as np, pyarrow as pa, pyarrow.parquet as pq
normal, out, kind, k = sys.argv[1], sys.argv[2], sys.argv[3], 2
t = pq.read_table(normal)
X = t["vec"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).astype(np.float32)
ids = t["id"]
del t
if kind == "ivf":  # dnnad's IVF-Flat settings: 4 sqrt(n) lists, 16 probed
    index = faiss.index_factory(X.shape[1], f"IVF{int(4 * np.sqrt(len(X)))},Flat")
    index.train(X)
    index.nprobe = 16
else:
    index = faiss.IndexFlatL2(X.shape[1])
index.add(X)
D, I = index.search(X, k + 1)
# leave-one-out: drop each row's own entry (not always first: ties, IVF), else its farthest extra neighbour
own = I == np.arange(len(X))[:, None]
drop = np.where(own.any(1), own.argmax(1), k)
keep = np.ones_like(own)
keep[np.arange(len(X)), drop] = False
scores = np.sqrt(np.maximum(D[keep].reshape(len(X), k), 0)).mean(1)
threshold = float(np.quantile(scores, 0.95))
np.save(out + "/vectors.npy", X)
pq.write_table(pa.table({"id": ids}), out + "/normal.parquet")
"""


def peak_rss(cmd: list[str]) -> tuple[float, dict[str, float]]:
    """(seconds, peak MiB of each of anonymous, file-backed and shared-memory resident pages) of one process.
    Shared memory is Ray's object store as far as the process touched it: counted once machine-wide, and
    spilled when it is full."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}

    def watch():
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
                   if k in peak}
            for k, v in kib.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    return time.perf_counter() - t0, {k: v / 2**10 for k, v in peak.items()}


def add_labels(path: Path, labels: int) -> None:
    """Give every row of the vectors file at ``path`` a string label (row number modulo ``labels``)."""
    t = pq.read_table(path)
    pq.write_table(t.append_column("label", pa.array([f"class-{i % labels}" for i in range(t.num_rows)])), path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", choices=("score", "rank"), default="score")
    ap.add_argument("--normal", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--labels", type=int, default=0, help="rank job: label the rows with this many labels")
    ap.add_argument("--index", choices=("flat", "ivf"), default="flat",
                    help="both sides' index: ivf makes 10^6 rows' leave-one-out searches minutes, not hours")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnnad-fitmem-"))
    normal, query = work / "normal.parquet", work / "query.parquet"
    write_vectors(normal, a.normal, a.dim, 1, "n")
    if a.labels:
        add_labels(normal, a.labels)
    write_vectors(query, 100, a.dim, 7, "q")
    (work / "base").mkdir()
    base_s, base = peak_rss([sys.executable, "-c", BASELINE, str(normal), str(work / "base"), a.index])
    if a.job == "score":
        cmd = ["score", "--normal", str(normal), "--query", str(query)]
        what = "fit + score 100 rows"
    else:
        cmd = ["rank", "--data", str(normal), *(["--label-column", "label"] if a.labels else [])]
        what = "rank: leave-one-out, duplicates, " + ("per-label rankings, " if a.labels else "") + "refit"
    s, dn = peak_rss([sys.executable, "-m", "dnnad.cli", *cmd, "--out", str(work / "out"), "--embedding-column",
                      "vec", "--index", a.index, "--quiet"])
    data_mib = a.normal * a.dim * 4 / 2**20
    stages = json.loads((work / "out" / "run.json").read_text())["timings_s"]
    shutil.rmtree(work)  # this run's own temporary folder
    flags = f"--job {a.job} --normal {a.normal} --dim {a.dim}" + (f" --labels {a.labels}" if a.labels else "") + (
        f" --index {a.index}" if a.index != "flat" else "")
    lines = [f"## Driver memory, {a.job} job ({dt.date.today()}, commit {git_rev()})", "",
             f"- command: `python benchmarks/fit_memory.py {flags}`",
             f"- machine: {machine()}", f"- the normal vectors: {data_mib:,.0f} MiB (float32)", "",
             "| | peak anonymous RSS | peak file-backed RSS | object-store pages mapped | wall |", "|---|---|---|---|---|",
             f"| plain process (read, {a.index} index, leave-one-out k-NN, save) | {base['RssAnon']:,.0f} MiB | "
             f"{base['RssFile']:,.0f} MiB | - | {base_s:.1f} s |",
             f"| dnnad driver ({what}, Ray in-process) | {dn['RssAnon']:,.0f} MiB | {dn['RssFile']:,.0f} MiB | "
             f"{dn['RssShmem']:,.0f} MiB | {s:.1f} s |",
             "", f"dnnad / plain peak anonymous RSS: {dn['RssAnon'] / base['RssAnon']:.2f}x", "",
             "dnnad's stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]
    write_results(f"{a.job}-memory-{a.normal}x{a.dim}" + (f"-{a.index}" if a.index != "flat" else ""), lines)


if __name__ == "__main__":
    main()
