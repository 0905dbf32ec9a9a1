"""Vector transforms fitted on the normal set, applied to normal and query vectors alike before the kNN.

``normalize="l2"`` scales every vector to unit length (Euclidean kNN then ranks like cosine similarity).
``whiten=True`` fits a Ledoit-Wolf shrinkage covariance ``S`` and mean ``m`` on the normal vectors (after
normalisation) and maps ``x → S^(-1/2) (x - m)`` (ZCA): the Euclidean distance between transformed vectors
is the Mahalanobis distance under ``S``, so DN2 scores become Mahalanobis-like kNN distances. The index is
built on transformed vectors; a saved model stores the transform as two .npy arrays (no pickle).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import NORMALIZE_KINDS
from .index import as_float32

MEAN_FILE, WHITENER_FILE = "transform-mean.npy", "transform-whitener.npy"


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm, float32 (all-zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.float32(1e-12))


@dataclass(frozen=True)
class FeatureTransform:
    """``transform(X)``: optional L2 normalisation, then optional whitening by ``whitener`` around ``mean``."""

    normalize: str | None = None
    mean: np.ndarray | None = None  # (d,) float64, with whitening
    whitener: np.ndarray | None = None  # (d, d) float64, symmetric S^(-1/2)
    shrinkage: float | None = None  # Ledoit-Wolf shrinkage coefficient, for the record

    @property
    def whiten(self) -> bool:
        return self.whitener is not None

    @property
    def is_identity(self) -> bool:
        return self.normalize is None and self.whitener is None

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, d) float32 transformed rows; the identity when no option is set."""
        X = as_float32(X)
        if self.normalize == "l2":
            X = l2_normalize(X)
        if self.whitener is not None:
            X = np.ascontiguousarray((X.astype(np.float64) - self.mean) @ self.whitener, dtype=np.float32)
        return X


def fit_transform(X: np.ndarray, normalize: str | None = None, whiten: bool = False) -> FeatureTransform:
    """Fit the transform on the normal vectors ``X`` (n, d)."""
    if normalize is not None and normalize not in NORMALIZE_KINDS:
        raise ValueError(f"normalize must be None or one of {NORMALIZE_KINDS}, got {normalize!r}")
    if not whiten:
        return FeatureTransform(normalize)
    from sklearn.covariance import ledoit_wolf_shrinkage

    Z = FeatureTransform(normalize).transform(X).astype(np.float64)
    n, d = Z.shape
    mean = Z.mean(axis=0)
    shrinkage = float(ledoit_wolf_shrinkage(Z, assume_centered=False))
    # sklearn's LedoitWolf covariance is (1 - s) C + s mu I with C = Zc'Zc / n and mu = trace(C) / d. Its
    # eigenvectors are Zc's right singular vectors (a thin SVD: min(n, d)^2 max(n, d), not d^3), with
    # eigenvalues (1 - s) sigma^2 / n + s mu on their span and s mu on the rest.
    _, sigma, vt = np.linalg.svd(Z - mean, full_matrices=False)
    var = sigma**2 / n
    mu = float(var.sum()) / d
    if not mu > 0:  # every normal vector identical: nothing to whiten
        return FeatureTransform(normalize, mean, np.eye(d), shrinkage)
    floor = mu * 1e-9
    inv_sqrt = 1.0 / np.sqrt(np.maximum((1 - shrinkage) * var + shrinkage * mu, floor))
    rest = 1.0 / np.sqrt(max(shrinkage * mu, floor))
    whitener = (vt.T * (inv_sqrt - rest)) @ vt + rest * np.eye(d)
    return FeatureTransform(normalize, mean, whitener, shrinkage)


def transform_files(t: FeatureTransform) -> dict[str, np.ndarray]:
    """The whitening arrays (if any) as the model directory's file names and contents."""
    return {MEAN_FILE: t.mean, WHITENER_FILE: t.whitener} if t.whiten else {}


def load_transform(read, normalize: str | None, whiten: bool, shrinkage: float | None, dim: int) -> FeatureTransform:
    """A saved transform (``read(name)`` loads one of the model's .npy files); ValueError on arrays that do
    not fit a ``dim``-dimensional model."""
    if normalize is not None and normalize not in NORMALIZE_KINDS:
        raise ValueError(f"unknown normalize {normalize!r}")
    if not whiten:
        return FeatureTransform(normalize)
    mean, whitener = read(MEAN_FILE), read(WHITENER_FILE)
    if mean.shape != (dim,) or whitener.shape != (dim, dim) or mean.dtype != np.float64 \
            or whitener.dtype != np.float64:
        raise ValueError(f"whitening arrays {mean.dtype} {mean.shape} / {whitener.dtype} {whitener.shape} "
                         f"do not fit dimension {dim}")
    if not (np.isfinite(mean).all() and np.isfinite(whitener).all()):
        raise ValueError("whitening arrays hold NaN or inf")
    return FeatureTransform(normalize, mean, whitener, shrinkage)
