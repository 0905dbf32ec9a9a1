"""Duplicate verification's cost: the fingerprint similarity of every candidate pair, measured by one process
(``core.duplicates.fingerprint_similarity``, what the library runs) and by the rank job's Ray tasks
(``stages.verify.parallel_similarity``) in the same run, on the same pairs.

    python benchmarks/verify.py --rows 50000

The rows are CIFAR-10 train images; each row's candidates are its 10 nearest rows by fingerprint (the job
takes k + 8 = 10 leave-one-out neighbours by embedding, which are more often mutual: about 300,000 unordered
pairs at 50,000 rows, against ~485,000 here). Ray starts in-process with every core before the clock
starts. Checks that both give the same similarities, up to float32 rounding (the BLAS blocks a product by
how many rows it multiplies and by its threads), and prints the largest difference.
"""
from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import DATASETS, git_rev, machine, write_results
from PIL import Image

from dnnad.core.duplicates import candidate_pairs, fingerprint_similarity
from dnnad.stages.verify import PAIRS_PER_TASK, parallel_similarity
from dnnad.vision.fingerprint import fingerprint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    args = ap.parse_args()
    import faiss
    import ray

    t = pq.read_table(DATASETS["cifar10"], columns=["image", "split"])
    images = t.filter(pc.equal(t["split"], "train"))["image"].to_pylist()[:args.rows]
    F = np.stack([fingerprint(Image.open(io.BytesIO(b))) for b in images])
    index = faiss.IndexFlatL2(F.shape[1])
    index.add(F.astype(np.float32))
    _, nb = index.search(F.astype(np.float32), 11)
    a, b = candidate_pairs(nb)
    key = np.unique(np.minimum(a, b) * len(F) + np.maximum(a, b))  # each unordered pair once, as PairCheck does
    a, b = np.divmod(key, len(F))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t0 = time.perf_counter()
    one = fingerprint_similarity(F, a, b)
    t1 = time.perf_counter()
    par = parallel_similarity(F, a, b)
    t2 = time.perf_counter()
    ray.shutdown()
    diff = float(np.abs(one - par).max()) if len(a) else 0.0
    assert diff <= 1e-5, f"the tasks' similarities differ from one process's by {diff:.2e}"
    lines = [f"# Duplicate verification: {len(a):,} candidate pairs of {len(F):,} rows", "",
             f"{machine()}; dnnad {git_rev()}; CIFAR-10 train rows, 10 candidates each; "
             f"{PAIRS_PER_TASK:,} pairs per task.", "",
             "| route | seconds | pairs/s | speed-up over one process |", "|---|---:|---:|---:|",
             f"| one process (`fingerprint_similarity`) | {t1 - t0:.1f} | {len(a) / (t1 - t0):,.0f} | 1.00x |",
             f"| Ray tasks (`parallel_similarity`, the rank job) | {t2 - t1:.1f} | {len(a) / (t2 - t1):,.0f} | "
             f"{(t1 - t0) / (t2 - t1):.2f}x |", "",
             f"Largest difference between the two routes' similarities: {diff:.1e}.", "",
             f"Command: `.venv/bin/python benchmarks/verify.py --rows {args.rows}`"]
    write_results(f"verify-{args.rows}", lines)


if __name__ == "__main__":
    main()
