"""Score stage: kNN scoring of embedding batches on a Ray actor pool that shares one copy of the index.

``KnnScorer`` is the ``map_batches`` callable; ``Scorer`` is the handle a job holds (object-store refs
of the shards and reference ids, k, threshold, calibration scores) and maps over a dataset.

With ``--shard-groups G`` no actor holds the whole index: G actor pools each hold a contiguous group of the
shards (``GroupSearch``), every query batch passes through all of them, each adding the exact top-k of its
group to the k nearest found so far (``core.index.merge_neighbours``), and ``KnnScorer`` only writes the
scores. For indexes larger than one node's memory: each pool asks Ray for its group's memory, so the groups
land on different nodes. Results are identical to one group's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from ..config import ConfigError, ScoreConfig
from ..core.dn2 import knn_score, score_against, self_exclusions
from ..core.index import ShardedIndex, merge_neighbours, shard_groups
from ..core.threshold import normal_percentile
from ..runtime import (
    FINAL_POOL_CPUS,
    SCORE_ACTOR_CPUS,
    SCORE_ACTOR_GPUS,
    cluster_resources,
    files_reach_every_actor,
    resolved,
    score_pool,
)
from ..sources import PASSTHROUGH
from .localize import MAP_COLUMNS, PATCH_SCORE, Bank, map_patches

SCORE_COLUMNS = pa.schema([
    ("id", pa.string()), ("score", pa.float64()), ("is_anomaly", pa.bool_()),
    ("normal_percentile", pa.float64()), ("neighbor_ids", pa.list_(pa.string())),
    ("neighbor_dists", pa.list_(pa.float64())), ("status", pa.string()), ("error", pa.string()),
])  # then the passthrough columns a source has (group, label, split, n_members)
CARRIED = (*PASSTHROUGH, "n_members", "cached", "_pos")  # group sizes, cache hits, calibration positions
NEAREST = ("_nn_dist", "_nn_pos")  # the k nearest so far, carried between shard-group stages


def _list_column(values: pa.Array, ok: np.ndarray, k: int, type_: pa.DataType) -> pa.Array:
    """k values per ok row, an empty list per error row, built without a per-row loop."""
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values).cast(type_)


@dataclass(frozen=True)
class SearchSpec:
    """How a searching actor searches, as object-store handles: built once per actor by ``IndexActor``.

    ``shards``: refs of the ``core.index.Shard`` s it holds (None: batches carry their k nearest, ``NEAREST``).
    ``exclude``: None (queries are not the reference set), "self" (leave-one-out: rows carry their reference
    position in ``_pos``) or "duplicates" (also skip exact duplicates, by ``groups``). ``transform``
    (``core.features.FeatureTransform``) is applied to query embeddings first; None when they are already
    transformed (the reference set itself, in a fit). ``exact`` False: compressed kinds score from their codes.
    """

    shards: list | None
    k: int
    exclude: str | None = None
    groups: object = None
    threads: int | None = None
    transform: object = None
    device: str = "cpu"
    exact: bool = True


class IndexActor:
    """The set-up every searching actor shares: FAISS threads, the index over its shards (the one shared copy
    in the object store), the exclusion groups and the query transform."""

    def __init__(self, search: SearchSpec):
        import faiss

        if search.threads:
            faiss.omp_set_num_threads(search.threads)
        self.index = (ShardedIndex([resolved(s) for s in resolved(search.shards)], device=search.device,
                                   exact=search.exact) if search.shards is not None else None)
        self.k, self.exclude, self.transform = search.k, search.exclude, resolved(search.transform)
        self.groups = resolved(search.groups) if search.exclude == "duplicates" else None

    def exclusion(self, batch: dict, rows: np.ndarray):
        return self_exclusions(batch["_pos"][rows], self.groups) if self.exclude else None


class KnnScorer(IndexActor):
    """Scoring actor: the score columns of every row (error rows carried with their reason).

    ``ids`` name the neighbours (None: by position, for the calibration of a fit); ``threshold`` and
    ``calibration`` (the model's sorted calibration scores) add ``is_anomaly`` and ``normal_percentile``;
    ``positions`` adds the neighbours' reference positions (``_nbr_pos``).
    """

    def __init__(self, search: SearchSpec, ids, threshold: float | None, calibration=None, positions: bool = False):
        super().__init__(search)
        ids = resolved(ids)
        self.ids = None if ids is None else pa.array(np.asarray(ids, dtype=object).tolist(), pa.string())
        self.threshold, self.positions = threshold, positions
        self.calibration = resolved(calibration)

    def _names(self, pos: np.ndarray) -> pa.Array:
        return pa.array(pos).cast(pa.string()) if self.ids is None else self.ids.take(pa.array(pos))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        ok = batch["status"] == "ok"
        rows = np.flatnonzero(ok)
        score = np.full(n, np.nan)
        dist = np.empty((0, self.k))
        pos = np.empty((0, self.k), dtype=np.int64)
        if len(rows) and self.index is None:
            dist, pos = batch[NEAREST[0]][rows], batch[NEAREST[1]][rows]
            score[rows] = knn_score(dist)
        elif len(rows):
            X = batch["embedding"][rows]
            if self.transform is not None:
                X = self.transform.transform(X)
            score[rows], dist, pos = score_against(self.index, X, self.k, exclude=self.exclusion(batch, rows))
        if PATCH_SCORE in batch:  # --localize: the image's score is its map's (neighbours stay the global ones)
            score[rows] = batch[PATCH_SCORE][rows]
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
        if "anomaly_map" in batch:
            maps = np.asarray(batch["anomaly_map"], np.float32)
            table = table.append_column("anomaly_map", _list_column(pa.array(maps[ok].ravel(), pa.float32()), ok,
                                                                    maps.shape[1], pa.list_(pa.float32())))
            for c in MAP_COLUMNS[1:]:
                table = table.append_column(c, pa.array(batch[c], pa.int64(), mask=~ok))
        if self.positions:
            table = table.append_column("_nbr_pos", _list_column(pa.array(pos.ravel(), pa.int64()), ok, self.k,
                                                                 pa.list_(pa.int64())))
        return table


class GroupSearch(IndexActor):
    """One shard group's actor: adds the exact top-k of its group to each row's k nearest so far (``NEAREST``).
    The first group's stage applies ``transform`` and hands the transformed embeddings on."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        rows = np.flatnonzero(batch["status"] == "ok")
        if NEAREST[0] not in batch:
            batch[NEAREST[0]], batch[NEAREST[1]] = np.full((n, self.k), np.inf), np.full((n, self.k), -1, np.int64)
        if self.transform is not None:  # every batch leaves with the transformed width, error rows NaN
            X = self.transform.transform(batch["embedding"][rows]) if len(rows) else None
            emb = np.full((n, self.transform.dim or batch["embedding"].shape[1]), np.nan, dtype=np.float32)
            if X is not None:
                emb[rows] = X
            batch["embedding"] = emb
        if not len(rows):
            return batch
        X = batch["embedding"][rows]
        excl = self.exclusion(batch, rows)
        need = self.k + (excl.max_rows if excl is not None else 0)
        if self.index.ntotal < need:
            raise ValueError(f"a shard group holds {self.index.ntotal} reference rows; k={self.k} with "
                             f"exclusions needs {need}: use fewer --shard-groups")
        D, I = self.index.search(X, self.k, exclude=excl)
        D, I = merge_neighbours(batch[NEAREST[0]][rows], batch[NEAREST[1]][rows], D, I, self.k)
        batch[NEAREST[0]] = batch[NEAREST[0]].copy()
        batch[NEAREST[1]] = batch[NEAREST[1]].copy()
        batch[NEAREST[0]][rows], batch[NEAREST[1]][rows] = D, I
        return batch


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
    exact: bool = True  # False: compressed kinds score from their codes (a model fitted with --approximate)
    shard_rows: list | None = None  # rows per shard (shard groups are balanced by rows)
    shard_bytes: list | None = None  # memory a scoring actor holds per shard (Ray's memory request per group)
    bank: Bank | None = None  # --localize: the patch memory bank; rows are mapped before their kNN search

    @classmethod
    def of(cls, model, cfg: ScoreConfig, files_shared: bool | None = None, shard_refs: list | None = None) -> Scorer:
        """A handle on a fitted or loaded ``core.model.FittedModel``. Memory-mapped shards travel as their file
        paths where every actor can open them (``files_shared``; default: ``files_reach_every_actor()``),
        else with their rows, through the object store. ``shard_refs``: object-store refs of exactly
        ``model.shards`` (the fit's ``Fit.handle``), used as they are rather than put again."""
        import ray

        shards = model.shards
        if shard_refs is None:
            if files_shared is None:
                files_shared = files_reach_every_actor()
            shards = shards if files_shared else [s.by_value() for s in shards]
            shard_refs = [ray.put(s) for s in shards]
        return cls(list(shard_refs), ray.put(model.ids), model.k, model.threshold, cfg,
                   ray.put(model.calibration_scores),
                   None if model.transform.is_identity else ray.put(model.transform), not model.meta.approximate,
                   [len(s.vectors) for s in shards], [s.memory_bytes for s in shards],
                   Bank.of(model, files_shared is not False) if model.bank is not None else None)

    def map(self, ds, exclude: str | None = None, groups_ref=None, positions: bool = False):
        """``ds`` scored (lazily): one output row per input row."""
        from ray.data import ActorPoolStrategy

        # the scoring share of each GPU (the embedding actors upstream hold the rest), halved between the patch
        # scorers and these when both stream
        share = SCORE_ACTOR_GPUS / 2 if self.bank is not None else SCORE_ACTOR_GPUS
        if self.bank is not None:
            ds = map_patches(ds, self.bank, self.cfg, gpu_share=share)
        cpus, gpus = cluster_resources()
        actors, threads = score_pool(cpus, self.cfg.actors)
        res = {"num_cpus": SCORE_ACTOR_CPUS}
        if gpus:  # a share of one GPU per scoring actor: FAISS searches there
            actors, res = min(actors, gpus), {**res, "num_gpus": share}
        device = "cuda" if gpus else "cpu"
        groups = shard_groups(self.shard_rows or [1] * len(self.shards), self.cfg.shard_groups)
        search = SearchSpec(self.shards, self.k, exclude, groups_ref, threads, self.transform, device, self.exact)
        if len(groups) > 1 and self.shard_rows:  # each group must hold k rows beside the ones a query leaves out
            left_out = (0 if exclude is None else 1 if exclude == "self"
                        else int(np.bincount(resolved(groups_ref)).max()))  # a row's whole duplicate group
            held = min(sum(self.shard_rows[j] for j in g) for g in groups)
            if held < self.k + left_out:
                raise ConfigError(f"--shard-groups {self.cfg.shard_groups}: a group of index shards holds {held} "
                                  f"reference rows; k={self.k} with exclusions needs {self.k + left_out}: use fewer groups")
        if len(groups) > 1:  # each pool holds one group; its actors share the group's memory request
            per_pool = max(1, actors // len(groups))
            group_res = {**res, **({"num_gpus": share / len(groups)} if gpus else {})}
            for i, group in enumerate(groups):
                memory = sum(self.shard_bytes[j] for j in group) // per_pool if self.shard_bytes else 0
                ds = ds.map_batches(
                    GroupSearch, batch_size=self.cfg.batch_size, batch_format="numpy",
                    compute=ActorPoolStrategy(size=per_pool), **group_res,
                    **({"memory": memory} if memory else {}),
                    fn_constructor_kwargs={"search": replace(search, shards=[self.shards[j] for j in group],
                                                             transform=search.transform if i == 0 else None)})
            # the final pool only writes the scores: no index, no GPU, a sliver of a CPU
            search = replace(search, shards=None, transform=None, exclude=None)
            actors, res = per_pool, {"num_cpus": FINAL_POOL_CPUS}
        return ds.map_batches(
            KnnScorer, batch_size=self.cfg.batch_size, compute=ActorPoolStrategy(size=actors),
            batch_format="numpy", **res,
            fn_constructor_kwargs={"search": search, "ids": self.ids, "threshold": self.threshold,
                                   "calibration": self.calibration, "positions": positions},
        )
