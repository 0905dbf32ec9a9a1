"""dnnad: deep nearest-neighbour anomaly detection (DN2) as a distributed batch scoring job.

``from dnnad import DN2`` loads the numeric core lazily, so the CLI starts without faiss or torch.
"""
__version__ = "0.2.0"

__all__ = ["DN2", "PatchDN2", "rank_outliers", "__version__"]


def __getattr__(name: str):
    if name in ("DN2", "rank_outliers"):
        from .core import estimator

        return getattr(estimator, name)
    if name == "PatchDN2":
        from .core.localize import PatchDN2

        return PatchDN2
    raise AttributeError(f"module 'dnnad' has no attribute {name!r}")
