"""DN2 as a scikit-learn outlier detector over embeddings already in memory (the jobs call the same fit routine)."""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from .dn2 import FitParams, LocalBackend, fit_reference, knn_score
from .settings import FIT_SETTINGS, INDEX_KINDS, NORMALIZE_KINDS


def _novelty(want: bool):
    """Methods of one mode only, as LocalOutlierFactor has them: new rows (novelty) or the fitted set."""
    def check(self) -> bool:
        if self.novelty != want:
            raise AttributeError(f"this method needs DN2(novelty={want}); novelty={self.novelty}")
        return True
    return check


class DN2(OutlierMixin, BaseEstimator):
    """Deep nearest-neighbour anomaly detection (Bergman, Cohen, Hoshen 2020) on embeddings.

    The DN2 score of a row is its mean Euclidean distance to the k nearest normal embeddings, **higher =
    more anomalous**: ``anomaly_score`` returns it, as every dnnad job writes it (column ``score``).
    The scikit-learn methods follow scikit-learn's outlier detectors, where higher means *more normal*:
    ``score_samples`` is the negated DN2 score, ``decision_function`` is ``score_samples - offset_``
    (negative = outlier; ``offset_ = -threshold_``) and ``predict`` returns -1 for outliers, +1 for inliers.

    ``novelty=True`` (the paper's one-class setting, default): fit on normal rows, then score new rows
    (``anomaly_score``, ``score_samples``, ``decision_function``, ``predict``). ``novelty=False`` (the
    unsupervised setting): ``fit_predict(X)`` labels each row of one set by its leave-one-out score against
    the rest (``loo_scores_``). As with ``LocalOutlierFactor``, each mode has only its own methods: a row
    of the fitted set scored as a new row finds itself at distance 0.

    The threshold is the ``quantile`` of the normal rows' leave-one-out scores, or ``1 - contamination``
    (the expected fraction of outliers in the fitted set, in (0, 0.5]). ``normalize="l2"`` / ``pca=D`` /
    ``whiten=True`` transform normal and query vectors alike first (``core.features``); with whitening the
    distances are Mahalanobis-like. ``approximate=True`` scores an ``ivfpq``/``sq8`` index from its codes.

    Fitted attributes: ``index_`` (ShardedIndex), ``k_`` (k after clamping), ``loo_scores_``
    (calibration scores of the normal rows: leave-one-out, or against the centroids when reduced),
    ``threshold_``, ``offset_``, ``threshold_reliable_``, ``n_normal_``, ``ids_`` (reference ids),
    ``reduction_``, ``transform_`` (``core.features.FeatureTransform``), ``n_features_in_``.
    """

    def __init__(self, k: int = 2, quantile: float = 0.99, contamination: float | None = None,
                 n_shards: int = 1, index: str = "flat", reduce: int | None = None,
                 exclude_duplicates: bool = False, normalize: str | None = None, whiten: bool = False,
                 pca: int | None = None, approximate: bool = False, novelty: bool = True):
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
        self.novelty = novelty

    def fit_params(self) -> FitParams:
        """The parameters as the core's ``FitParams`` (the estimator's parameters carry its field names)."""
        return FitParams(**{s.fit: getattr(self, s.fit) for s in FIT_SETTINGS})

    def _check_params(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"The {name!r} parameter of DN2 must be {what}. Got {getattr(self, name)!r} instead.")

        def integer(v, lo: int) -> bool:
            return isinstance(v, Integral) and not isinstance(v, bool) and v >= lo

        need(integer(self.k, 1), "k", "an int >= 1")
        need(isinstance(self.quantile, Real) and 0 < self.quantile <= 1, "quantile", "a float in (0, 1]")
        need(self.contamination is None or isinstance(self.contamination, Real) and 0 < self.contamination <= 0.5,
             "contamination", "None or a float in (0, 0.5]")
        need(integer(self.n_shards, 1), "n_shards", "an int >= 1")
        need(self.index in INDEX_KINDS, "index", f"one of {INDEX_KINDS}")
        need(self.reduce is None or integer(self.reduce, 2), "reduce", "None or an int >= 2")
        need(self.normalize is None or self.normalize in NORMALIZE_KINDS, "normalize", f"None or one of {NORMALIZE_KINDS}")
        need(self.pca is None or integer(self.pca, 1), "pca", "None or an int >= 1")
        for flag in ("exclude_duplicates", "whiten", "approximate", "novelty"):
            need(isinstance(getattr(self, flag), (bool, np.bool_)), flag, "a bool")

    def fit(self, X: np.ndarray, y=None, ids: np.ndarray | None = None) -> DN2:
        """Fit on normal embeddings ``X`` (n, d); ``y`` is ignored; ``ids`` name the rows."""
        self._check_params()
        X = validate_data(self, X, dtype=np.float32)
        if len(X) < 2:
            raise ValueError(f"DN2 needs at least 2 normal samples, got n_samples = {len(X)}")
        fit = fit_reference(X, ids, self.fit_params(), LocalBackend())
        self.index_, self.ids_, self.k_ = fit.handle, fit.ids, fit.k
        self.loo_scores_, self.threshold_, self.offset_ = fit.calibration_scores, fit.threshold, -fit.threshold
        self.threshold_reliable_, self.reduction_ = fit.threshold_reliable, fit.reduction
        self.n_normal_, self.transform_ = fit.n_normal, fit.transform
        return self

    @available_if(_novelty(False))
    def fit_predict(self, X: np.ndarray, y=None, ids: np.ndarray | None = None) -> np.ndarray:
        """-1 for the rows of ``X`` whose leave-one-out score against the rest is above the threshold, else +1."""
        return np.where(self.fit(X, ids=ids).loo_scores_ > self.threshold_, -1, 1)

    def _queries(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return self.transform_.transform(validate_data(self, X, dtype=np.float32, reset=False))

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (n, k) (after the feature transform) and positions (n, k) of the k nearest
        reference rows."""
        Xq = self._queries(X)
        return self.index_.search(Xq, self.k_)

    @available_if(_novelty(True))
    def anomaly_score(self, X: np.ndarray) -> np.ndarray:
        """DN2 score per row: mean distance to the k nearest normal rows (higher = more anomalous)."""
        return knn_score(self.kneighbors(X)[0])

    @available_if(_novelty(True))
    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """scikit-learn's orientation: the negated DN2 score (higher = more normal)."""
        return -self.anomaly_score(X)

    @available_if(_novelty(True))
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``score_samples(X) - offset_`` = threshold - DN2 score: negative for outliers."""
        return self.score_samples(X) - self.offset_

    @available_if(_novelty(True))
    def predict(self, X: np.ndarray) -> np.ndarray:
        """-1 for outliers (DN2 score above the threshold), +1 for inliers."""
        return np.where(self.decision_function(X) < 0, -1, 1)


def rank_outliers(X: np.ndarray, k: int = 2, exclude_duplicates: bool = False, n_shards: int = 1,
                  normalize: str | None = None, whiten: bool = False) -> np.ndarray:
    """Unsupervised setting: score each row of one set against the rest of the set (the feature
    transform, if any, is fitted on the whole set)."""
    return DN2(k=k, n_shards=n_shards, exclude_duplicates=exclude_duplicates, normalize=normalize,
               whiten=whiten, novelty=False).fit(X).loo_scores_
