"""DN2 as a scikit-learn style estimator over embeddings already in memory."""
from __future__ import annotations

import warnings

import faiss
import numpy as np

from .index import as_float32, build_index
from .scoring import duplicate_groups, score_against, self_exclusions
from .threshold import effective_quantile, threshold_from_scores, threshold_reliable


def clamp_k(k: int, n_normal: int) -> int:
    """k usable with ``n_normal`` reference rows while leaving one out; warns when it shrinks."""
    if n_normal < 2:
        raise ValueError(f"DN2 needs at least 2 normal samples, got {n_normal}")
    if k + 1 > n_normal:
        warnings.warn(f"k={k} needs {k + 1} normal samples for leave-one-out; using k={n_normal - 1}",
                      stacklevel=3)
        return n_normal - 1
    return k


def kmeans_reduce(X: np.ndarray, n_centroids: int, seed: int = 1234) -> np.ndarray:
    """Replace the reference set by ``n_centroids`` FAISS k-means centroids (the paper's speed-up)."""
    X = as_float32(X)
    n_centroids = int(min(n_centroids, len(X)))
    km = faiss.Kmeans(X.shape[1], n_centroids, niter=20, seed=seed, verbose=False)
    km.train(X)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


class DN2:
    """Deep nearest-neighbour anomaly detection (Bergman, Cohen, Hoshen 2020) on embeddings.

    ``score_samples`` returns the anomaly score, the mean Euclidean distance to the k nearest
    normal embeddings: higher means more anomalous (note: the opposite sign of scikit-learn's
    IsolationForest). ``predict`` returns 1 for anomalies, 0 for normal rows.

    Fitted attributes: ``index_`` (ShardedIndex), ``k_`` (k after clamping), ``loo_scores_``
    (leave-one-out scores of the normal set), ``threshold_``, ``n_normal_``, ``ids_``.
    """

    def __init__(self, k: int = 2, quantile: float = 0.99, contamination: float | None = None,
                 n_shards: int = 1, index: str = "flat", reduce: int | None = None,
                 exclude_duplicates: bool = False):
        self.k = k
        self.quantile = quantile
        self.contamination = contamination
        self.n_shards = n_shards
        self.index = index
        self.reduce = reduce
        self.exclude_duplicates = exclude_duplicates

    def fit(self, X: np.ndarray, ids: np.ndarray | None = None) -> "DN2":
        X = as_float32(X)
        if self.reduce:
            X = kmeans_reduce(X, self.reduce)
            ids = np.array([f"centroid-{i}" for i in range(len(X))], dtype=object)
        self.k_ = clamp_k(self.k, len(X))
        self.ids_ = np.asarray(ids if ids is not None else np.arange(len(X)).astype(str), dtype=object)
        self.index_ = build_index(X, self.n_shards, self.index)
        self.n_normal_ = len(X)
        self.loo_scores_ = self.loo_score(X)
        self.threshold_ = threshold_from_scores(self.loo_scores_, self.quantile, self.contamination)
        q = effective_quantile(self.quantile, self.contamination)
        self.threshold_reliable_ = threshold_reliable(len(X), q)
        return self

    def loo_score(self, X: np.ndarray) -> np.ndarray:
        """Scores of the fitted reference rows, each against all others (the unsupervised ranking)."""
        groups = duplicate_groups(X) if self.exclude_duplicates else None
        excl = self_exclusions(np.arange(len(X)), groups)
        return score_against(self.index_, X, self.k_, exclude=excl)[0]

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (n, k) and positions (n, k) of the k nearest normal rows."""
        return self.index_.search(X, self.k_)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return score_against(self.index_, X, self.k_)[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)


def rank_outliers(X: np.ndarray, k: int = 2, exclude_duplicates: bool = False,
                  n_shards: int = 1) -> np.ndarray:
    """Unsupervised setting: score each row of one set against the rest of the set."""
    return DN2(k=k, n_shards=n_shards, exclude_duplicates=exclude_duplicates).fit(X).loo_scores_
