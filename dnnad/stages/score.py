"""Score stage: kNN scoring of embedding batches on a Ray actor pool that shares one copy of the index.

``KnnScorer`` is the ``map_batches`` callable; ``Scorer`` is the handle a job holds (object-store refs
of the shards and reference ids, k, threshold, calibration scores) and maps over a dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import ScoreConfig
from ..core.dn2 import score_against, self_exclusions
from ..core.index import ShardedIndex
from ..core.threshold import normal_percentile
from ..runtime import SCORE_ACTOR_CPUS, SCORE_ACTOR_GPUS, cluster_resources, score_pool
from .read import PASSTHROUGH

SCORE_COLUMNS = pa.schema([
    ("id", pa.string()), ("score", pa.float64()), ("is_anomaly", pa.bool_()),
    ("normal_percentile", pa.float64()), ("neighbor_ids", pa.list_(pa.string())),
    ("neighbor_dists", pa.list_(pa.float64())), ("status", pa.string()), ("error", pa.string()),
])  # then the passthrough columns a source has (group, label, split, n_members)
CARRIED = (*PASSTHROUGH, "n_members", "cached", "_pos")  # group sizes, cache hits, calibration positions


def _list_column(values: pa.Array, ok: np.ndarray, k: int, type_: pa.DataType) -> pa.Array:
    """k values per ok row, an empty list per error row, built without a per-row loop."""
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values).cast(type_)


class KnnScorer:
    """Scoring actor. Refs are resolved once per actor: every actor maps the one shared copy.

    ``exclude``: None (queries are not the reference set), "self" (leave-one-out: rows carry their
    reference position in ``_pos``) or "duplicates" (also skip exact duplicates, by ``groups``).
    ``positions`` adds the neighbours' reference positions (``_nbr_pos``), for calibration.
    ``transform`` (``core.features.FeatureTransform``) is applied to query embeddings first; None when the
    queries are already transformed (the reference set itself, in a fit).
    """

    def __init__(self, shards, ids, k: int, threshold: float | None, calibration=None,
                 exclude: str | None = None, groups=None, positions: bool = False, threads: int | None = None,
                 transform=None, device: str = "cpu"):
        import faiss
        import ray

        if threads:
            faiss.omp_set_num_threads(threads)
        get = lambda r: ray.get(r) if isinstance(r, ray.ObjectRef) else r  # noqa: E731
        self.index = ShardedIndex([get(s) for s in get(shards)], device=device)
        ids = get(ids)  # None: neighbours are named by position (calibration of a fit)
        self.ids = None if ids is None else pa.array(np.asarray(ids, dtype=object).tolist(), pa.string())
        self.k, self.threshold, self.exclude, self.positions = k, threshold, exclude, positions
        self.calibration = get(calibration)
        self.groups = get(groups) if exclude == "duplicates" else None
        self.transform = get(transform)

    def _names(self, pos: np.ndarray) -> pa.Array:
        return pa.array(pos).cast(pa.string()) if self.ids is None else self.ids.take(pa.array(pos))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        ok = batch["status"] == "ok"
        rows = np.flatnonzero(ok)
        score = np.full(n, np.nan)
        dist = np.empty((0, self.k))
        pos = np.empty((0, self.k), dtype=np.int64)
        if len(rows):
            excl = self_exclusions(batch["_pos"][rows], self.groups) if self.exclude else None
            X = batch["embedding"][rows]
            if self.transform is not None:
                X = self.transform.transform(X)
            score[rows], dist, pos = score_against(self.index, X, self.k, exclude=excl)
        cols = {
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "score": pa.array(score, pa.float64(), mask=~ok),
            "is_anomaly": (pa.array(score > self.threshold, pa.bool_(), mask=~ok) if self.threshold is not None
                           else pa.nulls(n, pa.bool_())),
            "normal_percentile": (pa.array(normal_percentile(self.calibration, score), pa.float64(), mask=~ok)
                                  if self.calibration is not None else pa.nulls(n, pa.float64())),
            "neighbor_ids": _list_column(self._names(pos.ravel()), ok, self.k, pa.list_(pa.string())),
            "neighbor_dists": _list_column(pa.array(dist.ravel(), pa.float64()), ok, self.k,
                                           pa.list_(pa.float64())),
            "status": pa.array(batch["status"].tolist(), pa.string()),
            "error": pa.array([e if isinstance(e, str) else None for e in batch["error"]], pa.string()),
        }
        table = pa.table(cols, schema=SCORE_COLUMNS)
        for c in CARRIED:
            if c in batch:
                table = table.append_column(c, pa.array(batch[c].tolist()))
        if self.positions:
            table = table.append_column("_nbr_pos", _list_column(pa.array(pos.ravel(), pa.int64()), ok, self.k,
                                                                 pa.list_(pa.int64())))
        return table


@dataclass
class Scorer:
    """What every scoring actor reads, as object-store handles, plus how to score."""

    shards: list  # ObjectRefs of core.index.Shard
    ids: object  # ObjectRef of the reference ids
    k: int
    threshold: float | None
    cfg: ScoreConfig
    calibration: object = None  # ObjectRef of the sorted calibration scores (normal_percentile)
    transform: object = None  # ObjectRef of the model's core.features.FeatureTransform (None: identity)

    @classmethod
    def of(cls, model, cfg: ScoreConfig) -> Scorer:
        """A handle on a fitted or loaded ``core.model.FittedModel``."""
        import ray

        return cls([ray.put(s) for s in model.shards], ray.put(model.ids), model.k, model.threshold, cfg,
                   ray.put(model.calibration_scores),
                   None if model.transform.is_identity else ray.put(model.transform))

    def map(self, ds, exclude: str | None = None, groups_ref=None, positions: bool = False):
        """``ds`` scored (lazily): one output row per input row."""
        from ray.data import ActorPoolStrategy

        cpus, gpus = cluster_resources()
        actors, threads = score_pool(cpus, self.cfg.actors)
        res = {"num_cpus": SCORE_ACTOR_CPUS}
        if gpus:  # a share of one GPU per scoring actor: FAISS searches there
            actors, res = min(actors, gpus), {**res, "num_gpus": SCORE_ACTOR_GPUS}
        return ds.map_batches(
            KnnScorer, batch_size=self.cfg.batch_size, compute=ActorPoolStrategy(size=actors),
            batch_format="numpy", **res,
            fn_constructor_kwargs={"shards": self.shards, "ids": self.ids, "k": self.k,
                                   "threshold": self.threshold, "calibration": self.calibration,
                                   "exclude": exclude, "groups": groups_ref, "positions": positions,
                                   "threads": threads, "transform": self.transform,
                                   "device": "cuda" if gpus else "cpu"},
        )
