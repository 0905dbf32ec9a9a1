"""Array checks and the one L2 normaliser: numpy only, so the embedding side loads no faiss."""
from __future__ import annotations

import numpy as np


def as_float32(X: np.ndarray) -> np.ndarray:
    """(n, d) C-contiguous float32 view or copy of ``X``; rejects NaN/inf."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array of shape (n, d), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain NaN or inf")
    return X


def l2_normalize(X: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows of ``X`` (n, d) scaled to unit Euclidean norm, as ``dtype``; all-zero rows stay zero."""
    X = np.asarray(X, dtype=dtype)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), dtype(1e-12))
