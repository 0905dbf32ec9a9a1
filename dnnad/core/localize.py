"""Patch-level DN2 (PatchCore-style) over patch grids already in memory: where an image is anomalous.

``PatchDN2.fit`` takes the normal images' patch grids (n, h, w, d) (``vision.patches``), keeps a memory
bank of their patches (all, or a greedy coreset), and sets the threshold from leave-one-image-out maps: a
normal image's patches are scored against the bank without its own patches. ``anomaly_maps`` gives each
query patch's distance to its nearest normal patch; ``anomaly_score`` the maximum of the border-calibrated,
smoothed map (``core.patches.score_map``; the calibration comes from the same leave-one-image-out maps).
The jobs call the same ``patch_maps`` on the sharded index.
"""
from __future__ import annotations

import time

import numpy as np

from .index import Exclusion, ShardedIndex, build_index
from .patches import SIGMA, border_calibration, greedy_coreset, score_map
from .threshold import threshold_from_scores

QUERY_PATCHES = 65_536  # patches per search call: bounded memory for the candidate lists
# Normal images whose leave-one-image-out maps set the threshold: a 0.99 quantile of 1,000 scores has ten
# above it, and the fit stays linear in the normal set (each calibration image searches the whole bank).
CALIBRATION_IMAGES = 1000


def calibration_sample(n: int, limit: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """Sorted positions of the normal images calibrated: all of them up to ``limit``, else a seeded sample."""
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def patch_maps(index: ShardedIndex, grids: np.ndarray, owners: np.ndarray | None = None,
               bank_owners: np.ndarray | None = None, max_own: int = 0) -> np.ndarray:
    """Anomaly maps (n, h, w) float32: each patch's exact distance to its nearest bank patch. With
    ``owners`` (n,) and ``bank_owners`` (bank rows,), patches of image i never match bank rows whose owner is
    ``owners[i]`` (leave-one-image-out; ``max_own``: the most bank rows one image owns)."""
    n, h, w, d = grids.shape
    Q = np.ascontiguousarray(grids.reshape(-1, d), dtype=np.float32)
    q_owner = None if owners is None else np.repeat(np.asarray(owners, np.int64), h * w)
    out = np.empty(len(Q), dtype=np.float32)
    for a in range(0, len(Q), QUERY_PATCHES):
        b = min(len(Q), a + QUERY_PATCHES)
        excl = None if q_owner is None else Exclusion(q_owner[a:b], bank_owners, max(1, max_own))
        out[a:b] = index.search(Q[a:b], 1, exclude=excl)[0][:, 0]
    return out.reshape(n, h, w)


def map_scores(maps: np.ndarray, image_size: int, sigma: float = SIGMA, border: np.ndarray | None = None) -> np.ndarray:
    """Image scores (n,) float64 from patch maps (n, h, w): the maximum of each border-calibrated (``border``:
    ``core.patches.border_calibration``; None: none), smoothed map."""
    return np.array([float(score_map(m, image_size, border, sigma).max()) for m in maps], dtype=np.float64)


class PatchDN2:
    """Patch memory bank + nearest-neighbour anomaly maps, in scikit-learn's estimator style.

    ``coreset``: fraction of normal patches kept (greedy k-centre, ``core.patches.greedy_coreset``; the
    jobs' default 0.1; None or 1 keeps all). ``image_size``: the network's input side, the resolution maps
    are smoothed at. The threshold is the ``quantile`` of the normal images' leave-one-image-out scores (of
    ``calibration_sample``: every image up to ``CALIBRATION_IMAGES``, then a seeded sample). ``index``: the bank's
    index kind (``core.index.build_shard``; compressed kinds keep codes in memory and re-rank candidates by
    exact distance unless ``approximate``). Fitted attributes: ``index_``,
    ``bank_owners_`` (normal image of each bank row), ``border_`` (the border calibration of the
    leave-one-image-out maps; None with ``calibrate_border=False``), ``loo_scores_``, ``threshold_``, ``grid_``
    (h, w), ``coreset_seconds_``.
    """

    def __init__(self, coreset: float | None = 0.1, image_size: int = 260, sigma: float = SIGMA,
                 quantile: float = 0.99, n_shards: int = 1, seed: int = 0, calibrate_border: bool = True,
                 index: str = "flat", approximate: bool = False):
        self.coreset, self.image_size, self.sigma, self.calibrate_border = coreset, image_size, sigma, calibrate_border
        self.quantile, self.n_shards, self.seed = quantile, n_shards, seed
        self.index, self.approximate = index, approximate

    def fit(self, grids: np.ndarray) -> PatchDN2:
        """Fit on the normal images' patch grids (n, h, w, d), n >= 2."""
        if self.coreset is not None and not 0 < self.coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1] or None, got {self.coreset}")
        grids = np.asarray(grids, dtype=np.float32)
        if grids.ndim != 4 or len(grids) < 2:
            raise ValueError(f"patch grids must be (n >= 2, h, w, d), got {grids.shape}")
        n, h, w, d = grids.shape
        bank = grids.reshape(-1, d)
        owners = np.repeat(np.arange(n), h * w)
        t0 = time.perf_counter()
        keep = greedy_coreset(bank, self.coreset or 1.0, h * w, self.seed)
        self.coreset_seconds_ = time.perf_counter() - t0
        self.index_ = build_index(bank[keep], self.n_shards, self.index, exact=not self.approximate)
        self.bank_owners_ = owners[keep]
        self.grid_ = (h, w)
        counts = np.bincount(self.bank_owners_, minlength=n)
        if (counts == len(keep)).any():
            raise ValueError("every bank patch belongs to one image: leave-one-image-out needs more images")
        calib = calibration_sample(n)
        loo = patch_maps(self.index_, grids[calib], calib, self.bank_owners_, int(counts.max()))
        self.border_ = border_calibration(loo) if self.calibrate_border else None
        self.loo_scores_ = map_scores(loo, self.image_size, self.sigma, self.border_)
        self.threshold_ = float(threshold_from_scores(self.loo_scores_, self.quantile))
        return self

    def anomaly_maps(self, grids: np.ndarray) -> np.ndarray:
        """Patch maps (n, h, w) of new images: distance of each patch to its nearest normal patch."""
        grids = np.asarray(grids, dtype=np.float32)
        if grids.shape[1:3] != self.grid_ or grids.shape[3] != self.index_.d:
            raise ValueError(f"patch grids {grids.shape[1:]} do not match the fitted {(*self.grid_, self.index_.d)}")
        return patch_maps(self.index_, grids)

    def anomaly_score(self, grids: np.ndarray) -> np.ndarray:
        """Image scores (n,): the maximum of each border-calibrated, smoothed map (higher = more anomalous)."""
        return map_scores(self.anomaly_maps(grids), self.image_size, self.sigma, self.border_)

    def predict(self, grids: np.ndarray) -> np.ndarray:
        """-1 for anomalous images (score above the threshold), +1 for normal ones."""
        return np.where(self.anomaly_score(grids) > self.threshold_, -1, 1)
