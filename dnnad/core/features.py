"""Vector transforms fitted on the normal set, applied to normal and query vectors alike before the kNN.

``normalize="l2"`` scales every vector to unit length (Euclidean kNN then ranks like cosine similarity).
``whiten=True`` fits a Ledoit-Wolf shrinkage covariance ``S`` and mean ``m`` on the normal vectors (after
normalisation) and maps ``x → S^(-1/2) (x - m)`` (ZCA): the Euclidean distance between transformed vectors
is the Mahalanobis distance under ``S``, so DN2 scores become Mahalanobis-like kNN distances. ``pca=D``
projects the (normalised) vectors onto their D leading principal components first, so the index holds D
dimensions instead of d (smaller, faster); with whitening too, the covariance is fitted in those D dimensions.
Every option after normalisation is one affine map ``x → (x - mean) @ W``, W of shape (d, D). The index is
built on transformed vectors; a saved model stores the map as two .npy arrays (no pickle).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import as_float32, l2_normalize, map_rows
from .settings import NORMALIZE_KINDS

MEAN_FILE, WHITENER_FILE = "transform-mean.npy", "transform-whitener.npy"


@dataclass(frozen=True)
class FeatureTransform:
    """``transform(X)``: optional L2 normalisation, then the optional affine map ``(X - mean) @ whitener``
    (whitening, a PCA projection, or the projection then whitening)."""

    normalize: str | None = None
    mean: np.ndarray | None = None  # (d,) float64
    whitener: np.ndarray | None = None  # (d, D) float64: S^(-1/2), a PCA basis, or the two composed
    shrinkage: float | None = None  # Ledoit-Wolf shrinkage coefficient, for the record
    whiten: bool = False
    pca: int | None = None  # D: principal components kept

    @property
    def is_identity(self) -> bool:
        return self.normalize is None and self.whitener is None

    @property
    def dim(self) -> int | None:
        """Output dimension (None: that of the input)."""
        return None if self.whitener is None else int(self.whitener.shape[1])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, D) float32 transformed rows, ``ROW_CHUNK`` rows at a time (on disk when ``X`` is); the identity
        when no option is set."""
        X = as_float32(X)
        return X if self.is_identity else map_rows(X, self._rows, self.dim or X.shape[1], np.float32)

    def _rows(self, X: np.ndarray) -> np.ndarray:
        if self.normalize == "l2":
            X = l2_normalize(X)
        if self.whitener is not None:
            X = (X.astype(np.float64) - self.mean) @ self.whitener
        return X


def fit_transform(X: np.ndarray, normalize: str | None = None, whiten: bool = False,
                  pca: int | None = None) -> FeatureTransform:
    """Fit the transform on the normal vectors ``X`` (n, d); ``pca`` must not exceed min(n, d)."""
    if normalize is not None and normalize not in NORMALIZE_KINDS:
        raise ValueError(f"normalize must be None or one of {NORMALIZE_KINDS}, got {normalize!r}")
    if not whiten and not pca:
        return FeatureTransform(normalize)
    Z = FeatureTransform(normalize).transform(X).astype(np.float64)
    n, d = Z.shape
    if pca is not None and not 1 <= pca <= min(n, d):
        raise ValueError(f"pca={pca} components need 1 <= pca <= min(normal rows, dimensions) = {min(n, d)}")
    mean = Z.mean(axis=0)
    # One thin SVD of the centred rows (min(n, d)^2 max(n, d), not d^3) serves both options: its right singular
    # vectors are the principal axes, and the eigenvectors of every covariance estimate below.
    _, sigma, vt = np.linalg.svd(Z - mean, full_matrices=False)
    basis = np.eye(d)
    if pca:
        basis, Z, sigma, vt = vt[:pca].T, (Z - mean) @ vt[:pca].T, sigma[:pca], np.eye(pca)
        d = pca
    if not whiten:
        return FeatureTransform(normalize, mean, np.ascontiguousarray(basis), None, False, pca)
    from sklearn.covariance import ledoit_wolf_shrinkage

    shrinkage = float(ledoit_wolf_shrinkage(Z, assume_centered=False))
    # sklearn's LedoitWolf covariance is (1 - s) C + s mu I with C = Zc'Zc / n and mu = trace(C) / d: the
    # eigenvectors of C, eigenvalues (1 - s) sigma^2 / n + s mu on their span and s mu on the rest.
    var = sigma**2 / n
    mu = float(var.sum()) / d
    if not mu > 0:  # every normal vector identical: nothing to whiten
        return FeatureTransform(normalize, mean, np.ascontiguousarray(basis), shrinkage, True, pca)
    floor = mu * 1e-9
    inv_sqrt = 1.0 / np.sqrt(np.maximum((1 - shrinkage) * var + shrinkage * mu, floor))
    rest = 1.0 / np.sqrt(max(shrinkage * mu, floor))
    whitener = (vt.T * (inv_sqrt - rest)) @ vt + rest * np.eye(d)
    return FeatureTransform(normalize, mean, np.ascontiguousarray(basis @ whitener), shrinkage, True, pca)


def transform_files(t: FeatureTransform) -> dict[str, np.ndarray]:
    """The affine map's arrays (if any) as the model directory's file names and contents."""
    return {MEAN_FILE: t.mean, WHITENER_FILE: t.whitener} if t.whitener is not None else {}


def load_transform(read, normalize: str | None, whiten: bool, shrinkage: float | None, dim: int,
                   input_dim: int | None = None, pca: int | None = None) -> FeatureTransform:
    """A saved transform (``read(name)`` loads one of the model's .npy files); ValueError on arrays that do
    not map ``input_dim`` (default ``dim``) dimensions to the model's ``dim``."""
    if normalize is not None and normalize not in NORMALIZE_KINDS:
        raise ValueError(f"unknown normalize {normalize!r}")
    if pca is not None and pca != dim:
        raise ValueError(f"pca={pca} does not match the model's dimension {dim}")
    if not whiten and not pca:
        return FeatureTransform(normalize)
    d_in = input_dim or dim
    mean, whitener = read(MEAN_FILE), read(WHITENER_FILE)
    if mean.shape != (d_in,) or whitener.shape != (d_in, dim) or mean.dtype != np.float64 \
            or whitener.dtype != np.float64:
        raise ValueError(f"transform arrays {mean.dtype} {mean.shape} / {whitener.dtype} {whitener.shape} "
                         f"do not map {d_in} to {dim} dimensions")
    if not (np.isfinite(mean).all() and np.isfinite(whitener).all()):
        raise ValueError("transform arrays hold NaN or inf")
    return FeatureTransform(normalize, mean, whitener, shrinkage, whiten, pca)
