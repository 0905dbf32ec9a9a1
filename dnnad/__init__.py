"""dnnad: deep nearest-neighbour anomaly detection (DN2) as a distributed batch scoring job."""
__version__ = "0.1.0"

from .estimator import DN2, rank_outliers  # noqa: E402

__all__ = ["DN2", "rank_outliers", "__version__"]
