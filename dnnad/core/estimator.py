"""DN2 as a scikit-learn estimator over embeddings already in memory (the jobs call the same fit routine)."""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

from ..config import INDEX_KINDS, NORMALIZE_KINDS
from .dn2 import FitParams, LocalBackend, fit_reference, knn_score


class DN2(OutlierMixin, BaseEstimator):
    """Deep nearest-neighbour anomaly detection (Bergman, Cohen, Hoshen 2020) on embeddings.

    ``score_samples`` returns the DN2 anomaly score, the mean Euclidean distance to the k nearest
    normal embeddings: **higher means more anomalous** (the opposite sign of IsolationForest's).
    ``normalize="l2"`` / ``pca=D`` / ``whiten=True`` transform normal and query vectors alike first
    (``core.features``); with whitening the distances are Mahalanobis-like. ``approximate=True`` scores an
    ``ivfpq``/``sq8`` index from its codes instead of re-ranking candidates exactly.
    ``decision_function`` is ``score - threshold_`` (positive = anomaly); ``predict`` returns 1 for
    anomalies and 0 for normal rows.

    Fitted attributes: ``index_`` (ShardedIndex), ``k_`` (k after clamping), ``loo_scores_``
    (calibration scores of the normal rows: leave-one-out, or against the centroids when reduced),
    ``threshold_``, ``threshold_reliable_``, ``n_normal_``, ``ids_`` (reference ids), ``reduction_``,
    ``transform_`` (``core.features.FeatureTransform``), ``n_features_in_``.
    """

    _parameter_constraints: dict = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "quantile": [Interval(Real, 0, 1, closed="right")],
        "contamination": [None, Interval(Real, 0, 1, closed="left")],
        "n_shards": [Interval(Integral, 1, None, closed="left")],
        "index": [StrOptions(set(INDEX_KINDS))],
        "reduce": [None, Interval(Integral, 2, None, closed="left")],
        "exclude_duplicates": ["boolean"],
        "normalize": [None, StrOptions(set(NORMALIZE_KINDS))],
        "whiten": ["boolean"],
        "pca": [None, Interval(Integral, 1, None, closed="left")],
        "approximate": ["boolean"],
    }

    def __init__(self, k: int = 2, quantile: float = 0.99, contamination: float | None = None,
                 n_shards: int = 1, index: str = "flat", reduce: int | None = None,
                 exclude_duplicates: bool = False, normalize: str | None = None, whiten: bool = False,
                 pca: int | None = None, approximate: bool = False):
        self.k = k
        self.quantile = quantile
        self.contamination = contamination
        self.n_shards = n_shards
        self.index = index
        self.reduce = reduce
        self.exclude_duplicates = exclude_duplicates
        self.normalize = normalize
        self.whiten = whiten
        self.pca = pca
        self.approximate = approximate

    def fit_params(self) -> FitParams:
        return FitParams(k=self.k, quantile=self.quantile, contamination=self.contamination, n_shards=self.n_shards,
                         index=self.index, reduce=self.reduce, exclude_duplicates=self.exclude_duplicates,
                         normalize=self.normalize, whiten=self.whiten, pca=self.pca, approximate=self.approximate)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: np.ndarray, y=None, ids: np.ndarray | None = None) -> DN2:
        """Fit on normal embeddings ``X`` (n, d); ``y`` is ignored; ``ids`` name the rows."""
        X = check_array(X, dtype=np.float32)
        fit = fit_reference(X, ids, self.fit_params(), LocalBackend())
        self.index_, self.ids_, self.k_ = fit.handle, fit.ids, fit.k
        self.loo_scores_, self.threshold_ = fit.calibration_scores, fit.threshold
        self.threshold_reliable_, self.reduction_ = fit.threshold_reliable, fit.reduction
        self.n_normal_, self.n_features_in_, self.transform_ = fit.n_normal, X.shape[1], fit.transform
        return self

    def _check(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, DN2 was fitted with {self.n_features_in_}")
        return X

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (n, k) (after the feature transform) and positions (n, k) of the k nearest
        reference rows."""
        return self.index_.search(self.transform_.transform(self._check(X)), self.k_)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """DN2 anomaly score per row (higher = more anomalous)."""
        return knn_score(self.kneighbors(X)[0])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.score_samples(X) - self.threshold_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)


def rank_outliers(X: np.ndarray, k: int = 2, exclude_duplicates: bool = False, n_shards: int = 1,
                  normalize: str | None = None, whiten: bool = False) -> np.ndarray:
    """Unsupervised setting: score each row of one set against the rest of the set (the feature
    transform, if any, is fitted on the whole set)."""
    return DN2(k=k, n_shards=n_shards, exclude_duplicates=exclude_duplicates, normalize=normalize,
               whiten=whiten).fit(X).loo_scores_
