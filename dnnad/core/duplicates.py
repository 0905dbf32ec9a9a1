"""Near-duplicate groups from a kNN search the caller already ran, verified pair by pair.

Two pieces of evidence decide whether a candidate pair (a row and one of its leave-one-out neighbours) is one
picture, and they add up:
- ``r``, its embedding distance over the larger of the two rows' distances to their farthest candidate: a
  ratio test against the neighbourhood, so one setting holds across backbones and image sizes;
- ``u``, how far its low-level fingerprints (``vision.fingerprint``) correlate beyond what the two rows'
  look-alikes reach: ``s`` is the best band-pass correlation over small rotations, zooms, shifts and a mirror
  (alignment forgives crops, rotations, frames and re-sampling), ``level`` the larger of the rows' median ``s``
  over their candidates, and ``u = (s - level) / (1 - level)``. Semantic look-alikes differ here, the same
  photo re-saved does not; and because it is relative, one setting holds where look-alikes share a silhouette
  (garments on black) and where they do not (photos).
Candidates come from the embedding's leave-one-out neighbours and, where there are images, from a second search
on the fingerprints themselves (``fingerprint_neighbours``): a blurred, noisy or greyscale copy can move out of
its source's embedding neighbourhood while its fingerprint stays close. Those extra pairs are judged by the same
rule; the yardstick of ``r`` and the ``level`` of ``u`` come from the embedding's candidates alone.
A pair is a copy when ``r / max_ratio + (1 - u) / (1 - min_similarity) <= 1``: up to ``max_ratio`` when the
fingerprints are identical, and ``u`` down to ``min_similarity`` when the embeddings are. Vectors without
images have the ratio test alone, at ``VECTOR_SHARE`` of the bound. Verified pairs join groups by complete linkage:
two groups merge only when every pair across them verifies, so a group never chains distinct pictures through
intermediate ones. Rows sharing a label in ``same`` (a content hash of the file bytes, identical vectors) are
always one group. Ray-free and vectorised except the merge loop, which visits verified pairs only.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter

from .arrays import l2_normalize
from .settings import DUPLICATE_RATIO, DUPLICATE_SIMILARITY

if TYPE_CHECKING:
    from .dn2 import SearchBackend

EXTRA_NEIGHBOURS = 8  # neighbours asked of the kNN search beyond k: the duplicate candidates of each row
FINGERPRINT_NEIGHBOURS = 10  # candidates of each row from the second search, on fingerprint descriptors
DESCRIPTOR_BAND = (1.0, 3.0)  # difference of Gaussians of the descriptors, grid cells: coarser than BAND, so a
# blurred copy keeps it
DESCRIPTOR_POOL = 2  # the band-passed centre window averaged in POOL x POOL cells: 12 x 12 = 144-d on 32 x 32
DESCRIPTOR_ROWS = 1 << 14  # fingerprints turned into descriptors at once
PAIR_BYTES = 1 << 24  # float64 bytes of one vectorised step of pair distances (16 MiB: 1,638 pairs at 1280-d; its
# temporaries are about four times that)
# The fingerprint alignment searched per pair (32 x 32 grid): copies are cropped, rotated, re-framed
ALIGN_ROTATIONS = (-8.0, -4.0, 0.0, 4.0, 8.0)  # degrees
ALIGN_ZOOMS = (0.92, 1.0, 1.08)
ALIGN_SHIFT = 4  # grid cells each way; the centre (side - 2 * shift) square is compared
BAND = (0.7, 2.1)  # difference of Gaussians, grid cells
TEMPLATE_BLURS = (0.0, 1.0)  # a re-sampled or re-encoded copy lost fine detail: compare a blurred template too
ALIGN_CHUNK = 32  # rows of b warped at once: their windows take ~3 MB each
CHECK_PAIRS = 1 << 18  # candidate pairs verified at once
LEVEL_PAIRS = 1 << 21  # (row, similarity) entries sorted at once for the rows' median similarities
VECTOR_SHARE = 0.2125  # vectors without images: the ratio test alone, at this share of its bound (0.425 at 2.0)
Similarity = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (F, a, b) -> s: fingerprint_similarity's


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


def pair_distances(X: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Distances between L2-normalised rows ``a[i]`` and ``b[i]`` of ``X``, in vectorised chunks of ``chunk``
    pairs (default: ``PAIR_BYTES`` of float64 rows; float64, without a normalised copy of ``X``)."""
    chunk = chunk or max(1, PAIR_BYTES // (8 * max(1, X.shape[1])))
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


@functools.lru_cache(maxsize=4)
def _warp_matrix(side: int) -> np.ndarray:
    """(warps * side * side, side * side): bilinear resampling of a grid by every rotation x zoom about its
    centre (edges extended), then the band-pass: one product warps and filters a whole chunk of fingerprints."""
    from scipy.sparse import csr_matrix

    c = (side - 1) / 2
    yy, xx = (np.mgrid[0:side, 0:side].astype(np.float64) - c).reshape(2, -1)
    rows, cols, vals = [], [], []
    for w, (th, z) in enumerate((th, z) for th in np.deg2rad(ALIGN_ROTATIONS) for z in ALIGN_ZOOMS):
        cos, sin = np.cos(th) / z, np.sin(th) / z
        y = np.clip(cos * yy - sin * xx + c, 0, side - 1)
        x = np.clip(sin * yy + cos * xx + c, 0, side - 1)
        y0, x0 = np.minimum(np.floor(y), side - 2).astype(np.int64), np.minimum(np.floor(x), side - 2).astype(np.int64)
        fy, fx = y - y0, x - x0
        out = w * side * side + np.arange(side * side)
        for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            rows.append(out), cols.append((y0 + dy) * side + x0 + dx), vals.append(wt)
    n = len(ALIGN_ROTATIONS) * len(ALIGN_ZOOMS)
    warp = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n * side * side, side * side))
    band = _band(np.eye(side * side).reshape(-1, side, side)).reshape(side * side, side * side).T  # band @ image
    return np.ascontiguousarray(np.concatenate([band @ warp[w * side * side:(w + 1) * side * side].toarray()
                                                for w in range(n)]), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _window_sums(side: int, c: int) -> np.ndarray:
    """(side * side, offsets) 0/1 matrix: an image times it sums each c x c window (float64, as the sums)."""
    k = side - c + 1
    box = np.zeros((side, side, k, k), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            box[i:i + c, j:j + c, i, j] = 1
    return box.reshape(side * side, k * k)


def _band(imgs: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """Difference of Gaussians over the last two axes: the detail a copy keeps and a look-alike lacks."""
    fine, coarse = (np.hypot(BAND[0], blur), np.hypot(BAND[1], blur))
    lead = (0,) * (imgs.ndim - 2)
    return gaussian_filter(imgs, (*lead, fine, fine)) - gaussian_filter(imgs, (*lead, coarse, coarse))


def _templates(imgs: np.ndarray, m: int) -> np.ndarray:
    """(len(imgs) * 2 * blurs, c * c) zero-mean unit centre windows of each image, as it is and mirrored, at
    every template blur."""
    both = np.stack([imgs, imgs[:, :, ::-1]], axis=1)  # (n, 2, side, side)
    t = np.stack([_band(both, blur)[..., m:-m, m:-m] for blur in TEMPLATE_BLURS], axis=2)
    t = t.reshape(-1, t.shape[-1] * t.shape[-2]).astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-6)


def fingerprint_similarity(F: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = ALIGN_CHUNK) -> np.ndarray:
    """Aligned correlation of fingerprints ``F[a[i]]`` and ``F[b[i]]`` (square grids, one per row of ``F``):
    the best normalised cross-correlation of their band-passed centres over small rotations, zooms and shifts
    of b, with a as it is or mirrored, sharp or blurred. Alignment forgives crops, rotations and re-sampling;
    the band-pass ignores tone and the shared silhouette of look-alikes. A flat fingerprint correlates with
    nothing. Vectorised over ``chunk`` distinct rows of b at a time."""
    side = int(round(np.sqrt(F.shape[1])))
    m = ALIGN_SHIFT
    c = side - 2 * m
    warp, sums = _warp_matrix(side), _window_sums(side, c)
    out = np.zeros(len(a), dtype=np.float64)
    if not len(a):
        return out
    order = np.argsort(b, kind="stable")
    bs, starts = np.unique(b[order], return_index=True)
    pairs_of = np.split(order, starts[1:])  # the pairs of each distinct row of b
    per = 2 * len(TEMPLATE_BLURS)
    for lo in range(0, len(bs), chunk):
        rows_of = pairs_of[lo:lo + chunk]
        imgs = F[bs[lo:lo + chunk]].astype(np.float32)
        W = (imgs @ warp.T).reshape(len(imgs), -1, side, side)  # (chunk, warps, side, side), band-passed
        flat = W.reshape(-1, side * side).astype(np.float64)
        s1, s2 = flat @ sums, (flat * flat) @ sums  # every window's sum and sum of squares
        norms = np.sqrt(np.maximum(s2 - s1 * s1 / (c * c), 0.0)).reshape(len(imgs), -1)
        win = np.lib.stride_tricks.sliding_window_view(W, (c, c), axis=(2, 3)).reshape(len(imgs), norms.shape[1], c * c)
        mine = np.concatenate(rows_of)
        ua, inv = np.unique(a[mine], return_inverse=True)
        T = _templates(F[ua].reshape(-1, side, side).astype(np.float32), m).reshape(len(ua), per, c * c)
        at = 0
        for j, rows in enumerate(rows_of):
            t = T[inv[at:at + len(rows)]].reshape(-1, c * c)
            at += len(rows)
            ncc = (win[j] @ t.T) / np.maximum(norms[j], 1e-6)[:, None]
            ncc[norms[j] < 1e-3] = 0.0  # a flat window
            out[rows] = ncc.max(axis=0).reshape(len(rows), per).max(axis=1)
    return out


def fingerprint_descriptors(F: np.ndarray) -> np.ndarray:
    """(n, (c / DESCRIPTOR_POOL) ** 2) float32 unit rows, c the compared centre's side: each fingerprint's
    band-passed centre (``DESCRIPTOR_BAND``, unaligned), pooled, zero-mean. Euclidean neighbours among them are
    fingerprints that correlate; a flat fingerprint is the zero row."""
    side = int(round(np.sqrt(F.shape[1])))
    m, p = ALIGN_SHIFT, DESCRIPTOR_POOL
    c = (side - 2 * m) // p * p
    out = np.empty((len(F), (c // p) ** 2), dtype=np.float32)
    fine, coarse = DESCRIPTOR_BAND
    for s in range(0, len(F), DESCRIPTOR_ROWS):
        g = np.asarray(F[s:s + DESCRIPTOR_ROWS], dtype=np.float32).reshape(-1, side, side)
        g = gaussian_filter(g, (0, fine, fine)) - gaussian_filter(g, (0, coarse, coarse))
        g = g[:, m:m + c, m:m + c].reshape(len(g), c // p, p, c // p, p).mean(axis=(2, 4)).reshape(len(g), -1)
        g -= g.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(g, axis=1, keepdims=True)
        out[s:s + len(g)] = np.where(norm > 1e-3, g / np.maximum(norm, 1e-3), 0.0)
    return out


def fingerprint_neighbours(F: np.ndarray, k: int = FINGERPRINT_NEIGHBOURS, backend: SearchBackend | None = None,
                           n_shards: int = 1) -> np.ndarray:
    """(n, k) positions: each row's leave-one-out nearest neighbours by ``fingerprint_descriptors`` (-1 for
    none, and for every neighbour of a flat fingerprint): the second candidate list of ``find_duplicates``.
    ``backend``: where the exact search runs (``core.dn2.SearchBackend``; default this process)."""
    from .dn2 import leave_one_out_neighbours

    G = fingerprint_descriptors(F)
    rows = np.flatnonzero(G.any(axis=1))  # a flat fingerprint correlates with nothing: left out of the search
    pos = np.full((len(G), k), -1, dtype=np.int64)
    if len(rows) >= 2:
        G = G if len(rows) == len(G) else G[rows]  # no second copy of the descriptors unless some are flat
        found = leave_one_out_neighbours(G, k, backend, n_shards)
        del G
        pos[rows, :found.shape[1]] = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    return pos


def position_dtype(n: int) -> np.dtype:
    """int32 for positions into ``n`` rows where it holds them (pair lists are ~10 per row), else int64."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def candidate_pairs(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, neighbour) position pairs of a kNN result ``neighbours`` (n, c); -1 entries and self-pairs dropped
    (``position_dtype`` positions)."""
    n, c = neighbours.shape
    dtype = position_dtype(n)
    a, b = np.repeat(np.arange(n, dtype=dtype), c), neighbours.astype(dtype).ravel()
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


def neighbourhood_level(n: int, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(n,) each row's median fingerprint similarity over its candidate pairs (a[i], b[i]) with similarity
    s[i] (0 without pairs): how alike this collection's look-alikes of the row already are."""
    level = np.zeros(n, dtype=np.float64)
    step = max(1, n * LEVEL_PAIRS // max(1, 2 * len(a)))  # rows per pass: about LEVEL_PAIRS entries to sort
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        ina, inb = (a >= r0) & (a < r1), (b >= r0) & (b < r1)
        rows, vals = np.concatenate([a[ina], b[inb]]) - r0, np.concatenate([s[ina], s[inb]])
        order = np.lexsort((vals, rows))
        rows, vals = rows[order], vals[order]
        count = np.bincount(rows, minlength=r1 - r0)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        has = count > 0
        lo, hi = start + (count - 1) // 2, start + count // 2
        level[r0:r1][has] = (vals[lo[has]] + vals[hi[has]]) / 2
    return level


def pair_keys(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a),) int64: one key per unordered pair of positions (a[i], b[i]) into ``n`` rows."""
    return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)


class PairCheck:
    """The verification of ``find_duplicates`` for any pairs of rows (the module docstring's rule); the
    fingerprint similarity of every candidate pair ``(a[i], b[i])``, and of the pairs ``more`` (which set no
    level), is measured once, here, by ``similarity`` (``fingerprint_similarity`` or a parallel runner of it:
    the jobs spread it over Ray tasks)."""

    def __init__(self, X: np.ndarray, scale: np.ndarray, fingerprints: np.ndarray | None, max_ratio: float,
                 min_similarity: float, labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                 similarity: Similarity = fingerprint_similarity, more: tuple[np.ndarray, np.ndarray] | None = None):
        self.X, self.scale, self.F = X, scale, fingerprints
        self.max_ratio, self.min_similarity, self.labels = max_ratio, min_similarity, labels
        if fingerprints is not None:
            own = np.unique(self._key(a, b))
            self.keys = own if more is None else np.union1d(own, self._key(*more))
            lo, hi = np.divmod(self.keys, len(X))
            self.s = similarity(fingerprints, lo, hi)
            lo, hi = np.divmod(own, len(X))  # the levels: the (a, b) candidates' similarities only
            self.level = neighbourhood_level(len(X), lo, hi, self.s[np.searchsorted(self.keys, own)])

    def _key(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pair_keys(len(self.X), a, b)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fingerprint similarity of pairs (a[i], b[i]), either way round: measured once per unordered pair."""
        key = self._key(a, b)
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        known = self.keys[at] == key
        s = np.where(known, self.s[at], np.nan)
        lo, hi = np.divmod(key[~known], len(self.X))
        s[~known] = fingerprint_similarity(self.F, lo, hi)
        return s

    def excess(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``u``: a pair's similarity beyond the larger of its rows' neighbourhood levels, as a share of what
        was left to 1 (1: identical; 0: as alike as the rows' look-alikes)."""
        level = np.minimum(np.maximum(self.level[a], self.level[b]), 1 - 1e-6)
        return (self.similarity(a, b) - level) / (1 - level)

    def ratio(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
        """``r``: a pair's embedding distance over the larger of its rows' neighbourhood distances."""
        scale = np.maximum(self.scale[a], self.scale[b])
        d = pair_distances(self.X, a, b) if d is None else d
        return np.divide(d, scale, out=np.full(len(a), np.inf), where=scale > 0)

    def __call__(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
        """(len(a),) bool: pairs (a[i], b[i]) that verify; ``d``: their distances when already measured. In
        slices of ``CHECK_PAIRS``: the test's float64 temporaries stay small however many pairs there are."""
        if len(a) <= CHECK_PAIRS:
            return self._check(a, b, d)
        return np.concatenate([self._check(a[i:i + CHECK_PAIRS], b[i:i + CHECK_PAIRS],
                                           None if d is None else d[i:i + CHECK_PAIRS])
                               for i in range(0, len(a), CHECK_PAIRS)])

    def _check(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None) -> np.ndarray:
        r = self.ratio(a, b, d)
        if self.F is None:
            ok = r <= self.max_ratio * VECTOR_SHARE
        else:
            ok = r <= self.max_ratio  # u <= 1: no pair beyond this verifies
            u = self.excess(a[ok], b[ok])
            ok[ok] = r[ok] / self.max_ratio + (1 - u) / (1 - self.min_similarity) <= 1
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


def pair_check(X: np.ndarray, neighbours: np.ndarray, fingerprints: np.ndarray | None = None,
               max_ratio: float = DUPLICATE_RATIO, min_similarity: float = DUPLICATE_SIMILARITY,
               same: Sequence[np.ndarray] = (), similarity: Similarity = fingerprint_similarity,
               more: np.ndarray | None = None) -> tuple[PairCheck, np.ndarray, np.ndarray, np.ndarray]:
    """The verification ``find_duplicates`` runs (arguments as there), with the candidate pairs (a, b) and
    their distances d, each measured once: the yardstick, the test and the merge order all use them. The
    pairs of ``more`` follow those of ``neighbours``: each unordered pair once, none already there, and none
    whose ratio alone rules it out."""
    a, b = candidate_pairs(neighbours)
    d = pair_distances(X, a, b)
    labels = _same_labels(len(X), same)
    scale = _farthest(len(X), a, d)
    if more is None or fingerprints is None:
        return PairCheck(X, scale, fingerprints, max_ratio, min_similarity, labels, a, b, similarity), a, b, d
    a2, b2 = candidate_pairs(more)
    new, first = np.unique(pair_keys(len(X), a2, b2), return_index=True)  # each unordered pair once ...
    first = first[~np.isin(new, pair_keys(len(X), a, b))]  # ... and none the embedding already offered
    a2, b2 = a2[first], b2[first]
    d2 = pair_distances(X, a2, b2)
    yardstick = np.maximum(scale[a2], scale[b2])
    keep = (yardstick > 0) & (d2 <= max_ratio * yardstick)  # r <= max_ratio, as PairCheck's test needs
    a2, b2, d2 = a2[keep], b2[keep], d2[keep]
    check = PairCheck(X, scale, fingerprints, max_ratio, min_similarity, labels, a, b, similarity, (a2, b2))
    return check, np.concatenate([a, a2]), np.concatenate([b, b2]), np.concatenate([d, d2])


def find_duplicates(X: np.ndarray, neighbours: np.ndarray, fingerprints: np.ndarray | None = None,
                    max_ratio: float = DUPLICATE_RATIO, min_similarity: float = DUPLICATE_SIMILARITY,
                    same: Sequence[np.ndarray] = (), similarity: Similarity = fingerprint_similarity,
                    more: np.ndarray | None = None) -> DuplicateGroups:
    """Near-duplicate groups among the candidate pairs of ``neighbours`` (n, c): each row's candidate positions
    from a leave-one-out kNN search, nearest first (-1 for none). ``fingerprints`` (n, side*side) uint8, or
    None for vectors without images (the ratio test alone). ``same``: label arrays (n,); rows sharing a label
    are one group whatever their distance. ``similarity`` measures the candidate pairs' fingerprints.
    ``more`` (n, c2): candidates from a second search (``fingerprint_neighbours``), verified by the same rule;
    ignored without fingerprints."""
    check, a, b, d = pair_check(X, neighbours, fingerprints, max_ratio, min_similarity, same, similarity, more)
    ok = check(a, b, d)
    a, b, d = a[ok], b[ok], d[ok]
    # complete linkage over verified pairs, closest first; label groups start merged
    group = check.labels.astype(np.int64)
    members: dict[int, list[int]] = {}  # groups of 2+ rows only: a row alone in its group is its own member
    for i in np.flatnonzero(np.bincount(group)[group] > 1).tolist():
        members.setdefault(int(group[i]), []).append(i)
    order = np.argsort(d, kind="stable")
    for p, q in zip(a[order].tolist(), b[order].tolist()):
        gp, gq = int(group[p]), int(group[q])
        if gp == gq:
            continue
        A, B = members.get(gp, [p]), members.get(gq, [q])
        if not check(np.repeat(A, len(B)), np.tile(B, len(A))).all():
            continue
        if len(A) < len(B):
            gp, gq, A, B = gq, gp, B, A
        A.extend(B)
        group[B] = gp
        members[gp] = A
        members.pop(gq, None)
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
