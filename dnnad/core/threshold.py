"""Anomaly threshold from the normal set's own leave-one-out scores."""
from __future__ import annotations

import numpy as np


def effective_quantile(quantile: float | None, contamination: float | None) -> float | None:
    """The quantile a threshold is taken at: ``1 - contamination`` when a rate is given."""
    return 1.0 - contamination if contamination is not None else quantile


def threshold_from_scores(loo_scores: np.ndarray, quantile: float | None = 0.99,
                          contamination: float | None = None) -> float:
    """Score above which a point is flagged.

    ``quantile`` of the leave-one-out scores of the normal set, or, when ``contamination`` is
    given (expected fraction of anomalies in that set), the ``1 - contamination`` quantile.
    """
    s = np.asarray(loo_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no leave-one-out scores to set a threshold from")
    q = effective_quantile(quantile, contamination)
    if q is None or not 0.0 < q <= 1.0:
        raise ValueError(f"threshold quantile must be in (0, 1], got {q}")
    return float(np.quantile(s, q, method="higher"))


def threshold_reliable(n_normal: int, quantile: float) -> bool:
    """Whether the normal set is large enough that the quantile is not simply its maximum."""
    return n_normal * (1.0 - quantile) >= 1.0


def normal_percentile(calibration_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Percentage of the normal set's calibration scores strictly below each score (100 = above them all):
    a score a person can read without the normal distribution beside it."""
    s = np.asarray(scores, dtype=np.float64)
    return 100.0 * np.searchsorted(calibration_sorted, s, side="left") / len(calibration_sorted)
