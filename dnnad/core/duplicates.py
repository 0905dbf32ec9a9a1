"""Near-duplicate groups from a kNN search the caller already ran, verified pair by pair.

Two pieces of evidence decide whether a candidate pair (a row and one of its leave-one-out neighbours) is one
picture, and they add up:
- ``r``, its embedding distance over the larger of the two rows' distances to their farthest candidate: a
  ratio test against the neighbourhood, so one setting holds across backbones and image sizes;
- ``s``, the normalised cross-correlation of its low-level fingerprints (``vision.fingerprint``), of the
  picture or its mirror image: semantic look-alikes differ here, the same photo re-saved does not.
A pair is a copy when ``r / max_ratio + (1 - s) / (1 - min_similarity) <= 1``: up to ``max_ratio`` when the
fingerprints are identical, and fingerprints down to ``min_similarity`` when the embeddings are. Vectors
without images have the ratio test alone, at half the bound. Verified pairs join groups by complete linkage:
two groups merge only when every pair across them verifies, so a group never chains distinct pictures through
intermediate ones. Rows sharing a label in ``same`` (a content hash of the file bytes, identical vectors) are
always one group. Ray-free and vectorised except the merge loop, which visits verified pairs only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .arrays import l2_normalize
from .settings import DUPLICATE_RATIO, DUPLICATE_SIMILARITY

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
    if len(a) < len(X) // 4:  # a few pairs: normalise just their rows
        for s in range(0, len(a), chunk):
            diff = l2_normalize(X[a[s:s + chunk]], np.float64) - l2_normalize(X[b[s:s + chunk]], np.float64)
            out[s:s + chunk] = np.sqrt(np.einsum("pd,pd->p", diff, diff))
        return out
    norms = np.concatenate([np.linalg.norm(X[s:s + chunk].astype(np.float64), axis=1) for s in range(0, len(X), chunk)])
    inv = 1.0 / np.maximum(norms, 1e-12)  # every row's norm once, in float64 as l2_normalize takes it
    for s in range(0, len(a), chunk):
        i, j = a[s:s + chunk], b[s:s + chunk]
        diff = X[i] * inv[i, None] - X[j] * inv[j, None]
        out[s:s + chunk] = np.sqrt(np.einsum("pd,pd->p", diff, diff))
    return out


def _centred(F: np.ndarray) -> np.ndarray:
    F = F.astype(np.float32)
    F -= F.mean(axis=1, keepdims=True)
    return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-6)


def fingerprint_similarity(F: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = PAIR_CHUNK) -> np.ndarray:
    """Normalised cross-correlation of fingerprints ``F[a[i]]`` and ``F[b[i]]`` (square grids, one per row of
    ``F``), the larger of b as it is and mirrored left-right; a flat fingerprint correlates with nothing."""
    side = int(round(np.sqrt(F.shape[1])))
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), chunk):
        fa, fb = _centred(F[a[s:s + chunk]]), _centred(F[b[s:s + chunk]])
        mirror = fb.reshape(-1, side, side)[:, :, ::-1].reshape(len(fb), -1)
        out[s:s + chunk] = np.maximum(np.einsum("pd,pd->p", fa, fb), np.einsum("pd,pd->p", fa, mirror))
    return out


def candidate_pairs(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, neighbour) position pairs of a kNN result ``neighbours`` (n, c); -1 entries and self-pairs dropped."""
    n, c = neighbours.shape
    a, b = np.repeat(np.arange(n, dtype=np.int64), c), neighbours.astype(np.int64).ravel()
    keep = (b >= 0) & (b != a)
    return a[keep], b[keep]


def neighbourhood_scale(X: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(n,) each row's distance to its farthest candidate (0 without candidates): the ratio test's yardstick."""
    a, b = candidate_pairs(neighbours)
    return _farthest(len(X), a, pair_distances(X, a, b))


def _farthest(n: int, a: np.ndarray, d: np.ndarray) -> np.ndarray:
    scale = np.zeros(n, dtype=np.float64)
    np.maximum.at(scale, a, d)
    return scale


class PairCheck:
    """The verification of ``find_duplicates`` for any pairs of rows (the module docstring's rule)."""

    def __init__(self, X: np.ndarray, scale: np.ndarray, fingerprints: np.ndarray | None, max_ratio: float,
                 min_similarity: float, labels: np.ndarray):
        self.X, self.scale, self.F = X, scale, fingerprints
        self.max_ratio, self.min_similarity, self.labels = max_ratio, min_similarity, labels

    def __call__(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
        """(len(a),) bool: pairs (a[i], b[i]) that verify; ``d``: their distances when already measured."""
        scale = np.maximum(self.scale[a], self.scale[b])
        d = pair_distances(self.X, a, b) if d is None else d
        r = np.divide(d, scale, out=np.full(len(a), np.inf), where=scale > 0)
        if self.F is None:
            ok = r <= self.max_ratio / 2
        else:
            ok = r <= self.max_ratio
            s = fingerprint_similarity(self.F, a[ok], b[ok])
            ok[ok] = r[ok] / self.max_ratio + (1 - s) / (1 - self.min_similarity) <= 1
        return ok | (self.labels[a] == self.labels[b])


def _same_labels(n: int, same: Sequence[np.ndarray]) -> np.ndarray:
    """(n,) int64: rows sharing a label in any of ``same`` share a number (connected through any of them)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = [np.arange(n, dtype=np.int64)], [np.arange(n, dtype=np.int64)]
    for labels in same:
        _, first, inv = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
        a.append(np.arange(n, dtype=np.int64)), b.append(first[inv.ravel()].astype(np.int64))
    a, b = np.concatenate(a), np.concatenate(b)
    return connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)[1]


def find_duplicates(X: np.ndarray, neighbours: np.ndarray, fingerprints: np.ndarray | None = None,
                    max_ratio: float = DUPLICATE_RATIO, min_similarity: float = DUPLICATE_SIMILARITY,
                    same: Sequence[np.ndarray] = ()) -> DuplicateGroups:
    """Near-duplicate groups among the candidate pairs of ``neighbours`` (n, c): each row's candidate positions
    from a leave-one-out kNN search, nearest first (-1 for none). ``fingerprints`` (n, side*side) uint8, or
    None for vectors without images (the ratio test alone). ``same``: label arrays (n,); rows sharing a label
    are one group whatever their distance."""
    n = len(X)
    labels = _same_labels(n, same)
    a, b = candidate_pairs(neighbours)
    d = pair_distances(X, a, b)  # measured once: the yardstick, the test and the merge order all use it
    check = PairCheck(X, _farthest(n, a, d), fingerprints, max_ratio, min_similarity, labels)
    ok = check(a, b, d)
    a, b, d = a[ok], b[ok], d[ok]
    # complete linkage over verified pairs, closest first; label groups start merged
    group = labels.astype(np.int64)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(i)
    order = np.argsort(d, kind="stable")
    for p, q in zip(a[order].tolist(), b[order].tolist()):
        gp, gq = group[p], group[q]
        if gp == gq:
            continue
        A, B = members[gp], members[gq]
        if not check(np.repeat(A, len(B)), np.tile(B, len(A))).all():
            continue
        if len(A) < len(B):
            gp, gq, A, B = gq, gp, B, A
        A.extend(B)
        group[B] = gp
        del members[gq]
    return number_groups(X, group)


def number_groups(X: np.ndarray, comp: np.ndarray) -> DuplicateGroups:
    """``DuplicateGroups`` from any component label per row: components of 2+ rows, numbered by first member."""
    n = len(X)
    _, comp = np.unique(comp, return_inverse=True)
    comp = comp.ravel()
    sizes = np.bincount(comp)
    _, lowest = np.unique(comp, return_index=True)  # first (lowest) position of each component
    firsts = np.sort(lowest[sizes >= 2])
    number = np.full(len(sizes), -1, dtype=np.int64)
    number[comp[firsts]] = np.arange(len(firsts))
    group = number[comp]
    grouped = np.flatnonzero(group >= 0)
    distance = np.full(n, np.nan)
    distance[grouped] = pair_distances(X, grouped, firsts[group[grouped]])
    return DuplicateGroups(group, distance, firsts.astype(np.int64), sizes[comp[firsts]].astype(np.int64))
