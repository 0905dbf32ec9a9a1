"""Near-duplicate groups from a kNN search the caller already ran: candidate pairs → distance threshold on
L2-normalised embeddings → connected components. Rows that share a label in ``same`` (a content hash of
the file bytes, identical vectors) are always one group. Ray-free, vectorised; no per-pair Python loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .arrays import l2_normalize

EXTRA_NEIGHBOURS = 8  # neighbours asked of the kNN search beyond k: the duplicate candidates of each row
PAIR_CHUNK = 1 << 16  # candidate pairs whose distances are computed in one vectorised step


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of two or more rows. ``group[i]`` is row i's group number (-1: no group); groups are numbered
    by their first member (lowest row position); ``distance[i]`` is the L2-normalised distance from row i to
    its group's first member (NaN outside groups)."""

    group: np.ndarray  # (n,) int64
    distance: np.ndarray  # (n,) float64
    first: np.ndarray  # (n_groups,) row position of each group's first member
    size: np.ndarray  # (n_groups,) members per group

    @property
    def n_groups(self) -> int:
        return len(self.first)

    @property
    def members(self) -> np.ndarray:
        """Positions of every grouped row, ordered by (group, position)."""
        rows = np.flatnonzero(self.group >= 0)
        return rows[np.argsort(self.group[rows], kind="stable")]

    @property
    def redundant(self) -> np.ndarray:
        """Positions of grouped rows other than their group's first member (sorted): what dropping keeps out."""
        rows = np.flatnonzero(self.group >= 0)
        return rows[self.first[self.group[rows]] != rows]


def pair_distances(X: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = PAIR_CHUNK) -> np.ndarray:
    """Distances between L2-normalised rows ``a[i]`` and ``b[i]`` of ``X``, in vectorised chunks (float64,
    without a normalised copy of ``X``)."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), chunk):
        diff = l2_normalize(X[a[s:s + chunk]], np.float64) - l2_normalize(X[b[s:s + chunk]], np.float64)
        out[s:s + chunk] = np.sqrt(np.einsum("pd,pd->p", diff, diff))
    return out


def candidate_pairs(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, neighbour) position pairs of a kNN result ``neighbours`` (n, c); -1 entries and self-pairs dropped."""
    n, c = neighbours.shape
    a, b = np.repeat(np.arange(n, dtype=np.int64), c), neighbours.astype(np.int64).ravel()
    keep = (b >= 0) & (b != a)
    return a[keep], b[keep]


def find_duplicates(X: np.ndarray, neighbours: np.ndarray, threshold: float,
                    same: Sequence[np.ndarray] = ()) -> DuplicateGroups:
    """Rows within ``threshold`` of each other on L2-normalised embeddings, joined into connected components.

    ``neighbours`` (n, c): each row's candidate positions from a kNN search (-1 for none); only these pairs
    are measured. ``same``: label arrays (n,); rows sharing a label are one group whatever their distance.
    """
    n = len(X)
    a, b = candidate_pairs(neighbours)
    close = pair_distances(X, a, b) <= threshold
    a, b = [a[close]], [b[close]]
    for labels in same:
        _, first, inv = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
        a.append(np.arange(n, dtype=np.int64)), b.append(first[inv.ravel()].astype(np.int64))
    a, b = np.concatenate(a), np.concatenate(b)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    _, lowest = np.unique(comp, return_index=True)  # first (lowest) position of each component
    firsts = np.sort(lowest[sizes >= 2])  # components of 2+ rows, in order of their first member
    number = np.full(len(sizes), -1, dtype=np.int64)
    number[comp[firsts]] = np.arange(len(firsts))
    group = number[comp]
    grouped = np.flatnonzero(group >= 0)
    distance = np.full(n, np.nan)
    distance[grouped] = pair_distances(X, grouped, firsts[group[grouped]])
    return DuplicateGroups(group, distance, firsts.astype(np.int64), sizes[comp[firsts]].astype(np.int64))
