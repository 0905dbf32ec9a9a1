"""Localise stage (``--localize``): the patch memory bank built by parallel Ray tasks, and ``PatchScorer``, the
``map_batches`` callable that turns each row's patch grid into its anomaly map and map score.

The fit: the normal images' patch grids (collected in id order) go to coreset tasks, one per chunk of whole
images (``core.patches.coreset_chunks``: the library's ``PatchDN2`` takes the same rows), the kept patches
to shard-building tasks, and the threshold comes from every normal image's leave-one-image-out map, scored
by the same actors that score queries. Maps stream to the sink with the other score columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import JobConfig
from ..core.index import ShardedIndex, build_shard, shard_bounds
from ..core.localize import patch_maps
from ..core.model import FittedModel, with_bank
from ..core.patches import SIGMA, coreset_chunk, coreset_chunks, coreset_projection, peak, smooth_map
from ..core.threshold import effective_quantile, threshold_from_scores
from ..runtime import SCORE_ACTOR_CPUS, cluster_resources, resolved, score_pool

PATCH_SCORE = "_patch_score"  # the map score, which KnnScorer writes as ``score``
MAP_COLUMNS = ("anomaly_map", "map_height", "map_width", "peak_x", "peak_y")


@dataclass(frozen=True)
class Bank:
    """What a patch-scoring actor reads, as object-store handles."""

    shards: list  # ObjectRefs of core.index.Shard
    owners: object  # ObjectRef of the (n_bank,) reference position of each patch's image
    image_size: int
    sigma: float = SIGMA

    @classmethod
    def of(cls, model: FittedModel) -> Bank:
        import ray

        return cls([ray.put(s) for s in model.bank], ray.put(model.bank_owners), int(model.meta.image_size))


class PatchScorer:
    """Patch-scoring actor: each ok row's ``patches`` grid → ``anomaly_map`` (row-major h x w), its size, the
    smoothed map's peak in the original image's pixels and the map score (``PATCH_SCORE``); ``patches`` is
    dropped. With ``exclude`` (a fit's calibration), rows carry their reference position in ``_pos`` and
    their patches never match their own image's."""

    def __init__(self, bank: Bank, exclude: bool = False, threads: int | None = None):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        self.index = ShardedIndex([resolved(s) for s in resolved(bank.shards)])
        self.owners = resolved(bank.owners) if exclude else None
        self.max_own = int(np.bincount(self.owners).max()) if exclude else 0
        self.size, self.sigma = bank.image_size, bank.sigma

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grids = batch.pop("patches")
        n, h, w = grids.shape[:3]
        rows = np.flatnonzero(batch["status"] == "ok")
        maps = np.full((n, h * w), np.nan, dtype=np.float32)
        score, px, py = np.full(n, np.nan), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        if len(rows):
            owners = batch["_pos"][rows] if self.owners is not None else None
            m = patch_maps(self.index, grids[rows], owners, self.owners, self.max_own)
            maps[rows] = m.reshape(len(rows), -1)
            for r, grid in zip(rows, m):
                s = smooth_map(grid, self.size, self.sigma)
                score[r] = float(s.max())
                px[r], py[r] = peak(s, int(batch["height"][r]) or self.size, int(batch["width"][r]) or self.size)
        batch.update({PATCH_SCORE: score, "anomaly_map": maps, "map_height": np.full(n, h), "map_width": np.full(n, w),
                      "peak_x": px, "peak_y": py})
        return batch


def map_patches(ds, bank: Bank, cfg, exclude: bool = False):
    """``ds`` (embedded rows with ``patches``) with its maps and map scores (lazy), on a pool of patch scorers."""
    from ray.data import ActorPoolStrategy

    cpus, _ = cluster_resources()
    actors, threads = score_pool(cpus, cfg.actors)
    return ds.map_batches(PatchScorer, batch_size=max(1, min(cfg.batch_size, 64)), batch_format="numpy",
                          compute=ActorPoolStrategy(size=actors), num_cpus=SCORE_ACTOR_CPUS,
                          fn_constructor_kwargs={"bank": bank, "exclude": exclude, "threads": threads})


def fit_bank(model: FittedModel, grids: np.ndarray, cfg: JobConfig) -> FittedModel:
    """``model`` (fitted on the normal images' embeddings, in the order of ``grids`` (n, h, w, d)) with its
    patch bank, and its threshold and calibration from leave-one-image-out map scores."""
    import ray
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n, h, w, d = grids.shape
    X = grids.reshape(-1, d)
    fraction = cfg.index.coreset
    if fraction is not None and fraction < 1:
        P = coreset_projection(d)
        task = ray.remote(coreset_chunk)
        chunks = coreset_chunks(n, h * w)
        picked = ray.get([task.remote(X[a * h * w:b * h * w], fraction, P) for a, b in chunks])
        keep = np.concatenate([a * h * w + p for (a, _), p in zip(chunks, picked)])
    else:
        keep = np.arange(len(X))
    bank_rows = np.ascontiguousarray(X[keep])
    build = ray.remote(build_shard)
    shards = ray.get([build.remote(bank_rows[a:b], a) for a, b in shard_bounds(len(bank_rows), cfg.index.shards)])
    owners = (keep // (h * w)).astype(np.int64)
    if np.bincount(owners, minlength=n).max() == len(owners):
        raise ValueError("every patch of the bank belongs to one image: --localize needs more normal images")
    bank = Bank([ray.put(s) for s in shards], ray.put(owners), int(cfg.embed.spec().image_size))
    cpus, _ = cluster_resources()
    step = max(1, -(-n // max(1, cpus)))
    table = pa.table({"_pos": pa.array(np.arange(n)), "status": pa.array(["ok"] * n),
                      "height": pa.array(np.zeros(n, np.int64)), "width": pa.array(np.zeros(n, np.int64)),
                      "patches": ArrowTensorArray.from_numpy(grids)})
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])
    scored = map_patches(ds, bank, cfg.score, exclude=True)
    t = pa.concat_tables(list(scored.select_columns(["_pos", PATCH_SCORE]).iter_batches(
        batch_size=None, batch_format="pyarrow"))).sort_by("_pos")
    loo = t[PATCH_SCORE].to_numpy()
    q = effective_quantile(cfg.score.quantile, cfg.score.contamination)
    return with_bank(model, shards, owners, loo, threshold_from_scores(loo, q), (h, w, d), fraction)
