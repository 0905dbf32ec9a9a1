"""The DN2 numeric core: scores, exclusions, and the one fit routine the estimator and the Ray job share.

``fit_reference`` does transform (``core.features``: L2 / PCA / whitening, fitted on the normal set) → reduce →
clamp k → build index → calibration scores → threshold. Where the index
lives and where the kNN queries run is a ``SearchBackend``: in this process (``LocalBackend``, used by
the ``DN2`` estimator) or on Ray actors (``dnnad.stages.fit.RayBackend``, used by the jobs). The steps
and their rules exist once, here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Protocol

import faiss
import numpy as np

from .arrays import as_float32, first_identical
from .features import FeatureTransform, fit_transform
from .index import Exclusion, ShardedIndex, build_index
from .settings import COMPRESSED_KINDS
from .threshold import effective_quantile, threshold_from_scores, threshold_reliable


def knn_score(dist: np.ndarray) -> np.ndarray:
    """DN2 score: mean Euclidean distance to the k nearest reference rows, shape (nq,)."""
    return np.asarray(dist, dtype=np.float64).mean(axis=1)


def self_exclusions(positions: np.ndarray, duplicate_groups: np.ndarray | None = None) -> Exclusion:
    """Reference positions each query may not use: itself, and its exact duplicates when given.

    ``duplicate_groups[p]`` is a group label per reference row (rows with equal labels hold
    identical vectors).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if duplicate_groups is None:
        return Exclusion(positions)
    groups = np.asarray(duplicate_groups, dtype=np.int64)
    mine = groups[positions]
    return Exclusion(mine, groups, int(np.bincount(groups)[mine].max(initial=1)), max_distinct=1)


def duplicate_groups(X: np.ndarray) -> np.ndarray:
    """Label per row such that rows with identical vectors share a label (``arrays.first_identical``: the index
    groups its rows the same way)."""
    _, labels = np.unique(first_identical(X), return_inverse=True)
    return labels.astype(np.int64).ravel()


def largest_copy_group(X: np.ndarray) -> int:
    """Rows in the largest group of identical rows of ``X`` (1 when all rows differ)."""
    return int(np.bincount(first_identical(X)).max(initial=1)) if len(X) else 0


class NoNeighbours(ValueError):
    """Every reference row is an exact copy of one row, so with duplicates excluded no row has a neighbour."""


def score_against(index: ShardedIndex, X: np.ndarray, k: int,
                  exclude: Exclusion | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (nq,), neighbour distances (nq, k), neighbour positions (nq, k))."""
    dist, pos = index.search(X, k, exclude=exclude)
    return knn_score(dist), dist, pos


def clamp_k(k: int, n_reference: int, leave_one_out: bool = True) -> int:
    """k usable with ``n_reference`` rows (one fewer when each row leaves itself out); warns when it shrinks."""
    usable = n_reference - 1 if leave_one_out else n_reference
    if usable < 1:
        raise ValueError(f"DN2 needs at least 2 normal samples, got {n_reference}")
    if k > usable:
        warnings.warn(f"k={k} needs {k + int(leave_one_out)} reference rows; using k={usable}", stacklevel=3)
        return usable
    return k


def kmeans_reduce(X: np.ndarray, n_centroids: int, seed: int = 1234) -> np.ndarray:
    """Replace the reference set by ``n_centroids`` FAISS k-means centroids (the paper's speed-up)."""
    X = as_float32(X)
    n_centroids = int(min(n_centroids, len(X)))
    km = faiss.Kmeans(X.shape[1], n_centroids, niter=20, seed=seed, verbose=False)
    km.train(X)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def centroid_ids(n: int) -> np.ndarray:
    return np.array([f"centroid-{i:06d}" for i in range(n)], dtype=object)


@dataclass(frozen=True)
class FitParams:
    """What a fit needs besides the data; the estimator's parameters and the job's flags map onto it."""

    k: int = 2
    quantile: float = 0.99
    contamination: float | None = None
    n_shards: int = 1
    index: str = "flat"
    reduce: int | None = None  # N k-means centroids replace the normal set
    exclude_duplicates: bool = False  # exact duplicates of a row are not its leave-one-out neighbours
    extra_neighbours: int = 0  # leave-one-out neighbours fetched beyond k (duplicate candidates); not scored
    normalize: str | None = None  # "l2": unit-length vectors (core.features)
    whiten: bool = False  # Ledoit-Wolf whitening fitted on the normal set (core.features)
    pca: int | None = None  # project onto this many principal components of the normal set (core.features)
    approximate: bool = False  # compressed index kinds: distances from the codes, no exact re-rank


class SearchBackend(Protocol):
    """Where the index is built and queried. ``search`` with ``positions`` leaves each query's own
    reference row out (and, with ``groups``, every row of its duplicate group)."""

    def build(self, X: np.ndarray, n_shards: int, kind: str, exact: bool = True) -> Any: ...

    def search(self, handle: Any, Xq: np.ndarray, k: int, positions: np.ndarray | None = None,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class LocalBackend:
    """Index built and searched in this process."""

    def build(self, X: np.ndarray, n_shards: int, kind: str, exact: bool = True) -> ShardedIndex:
        return build_index(X, n_shards, kind, exact=exact)

    def search(self, handle: ShardedIndex, Xq: np.ndarray, k: int, positions: np.ndarray | None = None,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        exclude = self_exclusions(positions, groups) if positions is not None else None
        return score_against(handle, Xq, k, exclude=exclude)


@dataclass
class Fit:
    """A fitted reference set: the index handle and everything the threshold was set from.

    ``calibration_*`` hold one row per normal row: its leave-one-out score against the rest of the
    reference set or, when the set was reduced to centroids, its score against the centroids.
    ``calibration_pos`` are neighbour positions in the reference set.
    """

    handle: Any
    reference: np.ndarray  # (n_reference, d) float32: the normal rows, or the centroids
    ids: np.ndarray  # reference ids
    k: int
    threshold: float
    threshold_quantile: float
    threshold_reliable: bool
    calibration_scores: np.ndarray
    calibration_dist: np.ndarray
    calibration_pos: np.ndarray
    reduction: str | None
    n_normal: int
    input_dim: int  # dimension of the normal embeddings before the transform
    transform: FeatureTransform  # applied to the normal rows before indexing; queries need it too
    neighbour_pos: np.ndarray | None = None  # (n, k + extra) leave-one-out neighbours; None for reduced fits
    neighbour_dist: np.ndarray | None = None  # (n, k + extra) their distances


def leave_one_out_neighbours(X: np.ndarray, k: int, backend: SearchBackend | None = None,
                             n_shards: int = 1) -> np.ndarray:
    """(n, min(k, n - 1)) int64 positions of each row's k nearest other rows of ``X`` (exact, flat index),
    nearest first; ties by position."""
    backend = backend or LocalBackend()
    X = as_float32(X)
    k = min(k, len(X) - 1)
    if k < 1:
        return np.full((len(X), 0), -1, dtype=np.int64)
    handle = backend.build(X, n_shards, "flat")
    return backend.search(handle, X, k, np.arange(len(X)))[2]


def fit_reference(X: np.ndarray, ids: np.ndarray | None, params: FitParams,
                  backend: SearchBackend | None = None) -> Fit:
    """Index the normal embeddings ``X`` and set the threshold from their calibration scores.

    The feature transform (``params.normalize`` / ``params.pca`` / ``params.whiten``) is fitted on ``X`` and everything
    after it (reduction, index, calibration) sees transformed vectors; ``Fit.transform`` must be applied
    to queries.

    Plain fits calibrate with leave-one-out scores (each row against the others). Reduced fits
    (``params.reduce``) score every *normal row* against the centroids: centroids are not samples,
    and queries are scored against the same centroids, so this is the distribution a query's score
    is compared with.
    """
    backend = backend or LocalBackend()
    X = as_float32(X)
    if len(X) < 2:
        raise ValueError(f"DN2 needs at least 2 normal samples, got {len(X)}")
    ids = np.asarray(ids if ids is not None else np.arange(len(X)).astype(str), dtype=object)
    if len(ids) != len(X):
        raise ValueError(f"{len(ids)} ids for {len(X)} rows")
    if params.approximate and params.index not in COMPRESSED_KINDS:
        raise ValueError(f"approximate scoring needs a compressed index ({', '.join(COMPRESSED_KINDS)}), "
                         f"not {params.index}")
    transform = fit_transform(X, params.normalize, params.whiten, params.pca)
    input_dim = X.shape[1]
    X = transform.transform(X)
    reference, ref_ids, reduction = X, ids, None
    if params.reduce:
        reference = kmeans_reduce(X, params.reduce)
        ref_ids = centroid_ids(len(reference))
        reduction = f"kmeans:{len(reference)} (from {len(X)} normal rows)"
    groups = duplicate_groups(reference) if params.exclude_duplicates and not reduction else None
    excluded = int(np.bincount(groups).max()) if groups is not None else 1
    if len(reference) - excluded < 1:
        raise NoNeighbours(f"--exclude-duplicates: all {len(reference)} normal rows are copies of one row, so no row "
                         "has a neighbour to be ranked against")
    # a row of the largest copy group may use the other len - excluded rows
    k = clamp_k(params.k, len(reference) - excluded + 1, leave_one_out=reduction is None)
    handle = backend.build(reference, params.n_shards, params.index, exact=not params.approximate)
    all_pos = all_dist = None
    if reduction:
        scores, dist, pos = backend.search(handle, X, k)
    else:
        extra = max(0, min(params.extra_neighbours, len(reference) - excluded - k))
        _, all_dist, all_pos = backend.search(handle, reference, k + extra, np.arange(len(reference)), groups)
        scores, dist, pos = knn_score(all_dist[:, :k]), all_dist[:, :k], all_pos[:, :k]
    q = effective_quantile(params.quantile, params.contamination)
    return Fit(handle, reference, ref_ids, k, threshold_from_scores(scores, q), q,
               threshold_reliable(len(scores), q), scores, dist, pos, reduction, len(X), input_dim, transform, all_pos,
               all_dist)


def rank_within_groups(X: np.ndarray, bounds: np.ndarray, params: FitParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each group of rows ``X[bounds[i]:bounds[i + 1]]`` ranked against the rest of its group, in this process
    (``fit_reference``'s leave-one-out scores, k clamped to the group): scores (n,), neighbour distances
    (n, k) and neighbour positions into ``X`` (n, k). A group of one row scores NaN; a group of fewer than
    k + 1 rows leaves its missing neighbours NaN / -1."""
    n, k = len(X), params.k
    scores, dist, pos = np.full(n, np.nan), np.full((n, k), np.nan), np.full((n, k), -1, dtype=np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < 2:
            continue  # nothing to rank against: NaN
        try:
            fit = fit_reference(X[a:b], None, replace(params, k=min(k, b - a - 1), n_shards=1, extra_neighbours=0))
        except NoNeighbours:
            continue  # every row a copy of one: NaN
        scores[a:b], dist[a:b, :fit.k], pos[a:b, :fit.k] = (fit.calibration_scores, fit.calibration_dist,
                                                            a + fit.calibration_pos)
    return scores, dist, pos
