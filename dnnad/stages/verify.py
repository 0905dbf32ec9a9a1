"""Duplicate verification's fingerprint similarities on parallel Ray tasks: the candidate pairs split by
their second row (each task measures whole rows of b, as ``core.duplicates.fingerprint_similarity`` does, so
every pair gets the value the single process gives, up to float32 rounding), the fingerprints put in the object store once."""
from __future__ import annotations

import numpy as np

from ..core.duplicates import fingerprint_similarity

PAIRS_PER_TASK = 20_000  # ~10 s of one core per task


def pair_pieces(b: np.ndarray, per_piece: int) -> list[np.ndarray]:
    """Positions of the pairs, grouped by b (stable), in pieces of about ``per_piece`` pairs that never split
    one value of b."""
    order = np.argsort(b, kind="stable")
    starts = np.flatnonzero(np.diff(b[order])) + 1  # where b changes in sorted order
    cuts = np.unique(starts[np.minimum(np.searchsorted(starts, np.arange(per_piece, len(b), per_piece)),
                                       len(starts) - 1)]) if len(starts) else np.zeros(0, np.int64)
    return [p for p in np.split(order, cuts) if len(p)]


def parallel_similarity(F: np.ndarray, a: np.ndarray, b: np.ndarray,
                        pairs_per_task: int = PAIRS_PER_TASK) -> np.ndarray:
    """``fingerprint_similarity(F, a, b)``, measured by Ray tasks of about ``pairs_per_task`` pairs each."""
    import ray

    if len(a) <= pairs_per_task:
        return fingerprint_similarity(F, a, b)
    pieces = pair_pieces(b, pairs_per_task)
    F_ref = ray.put(np.asarray(F))  # a disk array travels as its rows
    task = ray.remote(num_cpus=1)(fingerprint_similarity)
    refs = [task.remote(F_ref, a[p], b[p]) for p in pieces]
    out = np.empty(len(a), dtype=np.float64)
    for p, s in zip(pieces, ray.get(refs)):
        out[p] = s
    return out
