"""The DN2 scoring core shared by the estimator and the Ray scoring actors."""
from __future__ import annotations

import numpy as np

from .index import ShardedIndex


def knn_score(dist: np.ndarray) -> np.ndarray:
    """DN2 score: mean Euclidean distance to the k nearest reference rows, shape (nq,)."""
    return np.asarray(dist, dtype=np.float64).mean(axis=1)


def self_exclusions(positions: np.ndarray, duplicate_groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Reference positions each query may not use: itself, and its exact duplicates when given.

    ``duplicate_groups[p]`` is a group label per reference row (rows with equal labels hold
    identical vectors).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if duplicate_groups is None:
        return [np.array([p]) for p in positions]
    members: dict[int, np.ndarray] = {}
    out = []
    for p in positions:
        g = int(duplicate_groups[p])
        if g not in members:
            members[g] = np.flatnonzero(duplicate_groups == g)
        out.append(members[g])
    return out


def duplicate_groups(X: np.ndarray) -> np.ndarray:
    """Label per row such that rows with byte-identical vectors share a label."""
    X = np.ascontiguousarray(X)
    _, labels = np.unique(X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel(),
                          return_inverse=True)
    return labels.astype(np.int64)


def score_against(index: ShardedIndex, X: np.ndarray, k: int,
                  exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (nq,), neighbour distances (nq, k), neighbour positions (nq, k))."""
    dist, pos = index.search(X, k, exclude=exclude)
    return knn_score(dist), dist, pos
