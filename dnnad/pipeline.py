"""The Ray job: source → embed (actor pool) → sharded index (tasks, object store) → kNN (actor pool) → sink."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .backbones import get_spec
from .config import ConfigError, EmbedConfig, JobConfig, ScoreConfig
from .embed import PASSTHROUGH
from .estimator import clamp_k, kmeans_reduce
from .index import build_shard, shard_bounds
from .knn_actor import KnnScorer
from .model_store import FittedModel
from .scoring import duplicate_groups
from .threshold import effective_quantile, threshold_from_scores, threshold_reliable

log = logging.getLogger("dnnad")


def start_ray(quiet: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start Ray in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=not quiet,
                 include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None,
                 logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet


def cluster_resources() -> tuple[int, int]:
    import ray

    res = ray.cluster_resources()
    return max(1, int(res.get("CPU", 1))), int(res.get("GPU", 0))


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str, quiet: bool = False):
        t0 = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t0, 3)
        if not quiet:
            print(f"[dnnad] {name}: {self[name]:.1f}s", flush=True)


@dataclass
class Embedded:
    """Embeddings of a source's readable rows, sorted by (id, vector) for run-to-run determinism."""

    ids: np.ndarray
    X: np.ndarray  # (n, d) float32
    extra: dict  # passthrough columns (group, label, split) aligned with ids
    errors: pa.Table  # id, error of unreadable rows


def embed(ds, cfg: EmbedConfig, weights_ref, cache_ref=None):
    """Materialized dataset: id, embedding, status, error (+ group/label/split; hash/cached with a cache)."""
    from ray.data import ActorPoolStrategy

    from .embed import Embedder

    spec = get_spec(cfg.backbone, cfg.image_size)
    cpus, gpus = cluster_resources()
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda, but the Ray cluster has no GPUs")
    use_gpu = gpus > 0 and cfg.device != "cpu"
    if use_gpu:
        actors, threads, res = cfg.actors or gpus, cfg.threads, {"num_gpus": 1}
    else:
        threads = cfg.threads or min(4, cpus)
        actors, res = cfg.actors or max(1, cpus // threads), {"num_cpus": 1}
    return ds.map_batches(
        Embedder, batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=actors), batch_format="numpy",
        fn_constructor_kwargs={"spec": spec, "weights": weights_ref, "threads": threads,
                               "device": "cuda" if use_gpu else "cpu", "cache": cache_ref,
                               "batch_size": cfg.batch_size}, **res,
    ).materialize()


def collect(emb_ds) -> Embedded:
    ids, embs, status, errors, extra = [], [], [], [], {}
    for b in emb_ds.iter_batches(batch_size=4096, batch_format="numpy"):
        ids.append(b["id"]), embs.append(b["embedding"]), status.append(b["status"]), errors.append(b["error"])
        for c in PASSTHROUGH:
            if c in b:
                extra.setdefault(c, []).append(b[c])
    ids, X = np.concatenate(ids).astype(object), np.concatenate(embs).astype(np.float32)
    status, errors = np.concatenate(status), np.concatenate(errors)
    extra = {c: np.concatenate(v) for c, v in extra.items()}
    ok = status == "ok"
    order = sorted(np.flatnonzero(ok), key=lambda i: (ids[i], X[i].tobytes()))
    bad = np.flatnonzero(~ok)
    return Embedded(ids[order], np.ascontiguousarray(X[order]), {c: v[order] for c, v in extra.items()},
                    pa.table({"id": pa.array(ids[bad].tolist(), pa.string()),
                              "error": pa.array(errors[bad].tolist(), pa.string())}))


def put_shards(X: np.ndarray, n_shards: int, kind: str) -> list:
    """Build shards as parallel Ray tasks; the results stay in the object store (refs returned)."""
    import ray

    task = ray.remote(build_shard)
    return [task.remote(X[a:b], a, kind) for a, b in shard_bounds(len(X), n_shards)]


def knn_map(ds, shard_refs, ids_ref, k: int, threshold: float | None, cfg: ScoreConfig,
            exclude: str | None = None, groups_ref=None):
    """Score every row of ``ds`` on an actor pool sharing one copy of the index."""
    from ray.data import ActorPoolStrategy

    cpus, _ = cluster_resources()
    actors = cfg.actors or max(1, min(4, cpus // 2))
    return ds.map_batches(
        KnnScorer, batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=actors), batch_format="numpy", num_cpus=1,
        fn_constructor_kwargs={"shards": shard_refs, "normal_ids": ids_ref, "k": k, "threshold": threshold,
                               "exclude": exclude, "duplicate_groups": groups_ref,
                               "threads": max(1, cpus // actors)},
    )


def embedded_dataset(ids: np.ndarray, X: np.ndarray, blocks: int, extra: dict | None = None):
    """In-memory embeddings as a Ray Dataset of ok rows; ``_pos`` is each row's position in ``X``
    (the reference position when ``X`` is the indexed set, used for self-exclusion)."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(ids)
    table = pa.table({
        "id": pa.array(ids.tolist(), pa.string()), "embedding": ArrowTensorArray.from_numpy(X),
        "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()), "_pos": pa.array(np.arange(n)),
        **{c: pa.array(np.asarray(v).tolist()) for c, v in (extra or {}).items()},
    })
    step = max(1, -(-n // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])


def by_position(ds) -> pa.Table:
    """A scored dataset whose rows carry ``_pos``, collected and sorted by it."""
    t = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    return t.sort_by("_pos")


@dataclass
class Broadcast:
    """Object-store handles every scoring actor reads: index shards and normal ids."""

    shards: list
    ids: object

    @classmethod
    def of(cls, model: FittedModel) -> "Broadcast":
        import ray

        return cls([ray.put(s) for s in model.shards], ray.put(model.ids))


def fit(normal: Embedded, cfg: JobConfig, weights_identity: str) -> tuple[FittedModel, Broadcast, pa.Table]:
    """Index the normal embeddings and set the threshold from their leave-one-out scores.

    Returns the model, its object-store handles and the leave-one-out table (one row per
    reference row, in position order, with neighbours: the unsupervised ranking).
    """
    import ray

    X, ids, reduction = normal.X, normal.ids, None
    if len(X) == 0:
        raise ConfigError("the normal set has no readable images")
    if cfg.index.reduce:
        X = kmeans_reduce(X, cfg.index.reduce)
        ids = np.array([f"centroid-{i:06d}" for i in range(len(X))], dtype=object)
        reduction = f"kmeans:{len(X)} (from {len(normal.X)} normal rows)"
    k = clamp_k(cfg.score.k, len(X))
    bc = Broadcast(put_shards(X, cfg.index.shards, cfg.index.kind), ray.put(ids))
    cpus, _ = cluster_resources()
    if reduction:  # centroids are not samples: threshold from the normal rows scored against them
        loo_t = by_position(knn_map(embedded_dataset(normal.ids, normal.X, cpus), bc.shards, bc.ids, k, None,
                                    cfg.score))
    else:
        exclude = "duplicates" if cfg.score.exclude_duplicates else "self"
        groups_ref = ray.put(duplicate_groups(X)) if exclude == "duplicates" else None
        loo_t = by_position(knn_map(embedded_dataset(ids, X, cpus), bc.shards, bc.ids, k, None, cfg.score,
                                    exclude=exclude, groups_ref=groups_ref))
    loo = loo_t["score"].to_numpy()
    q = effective_quantile(cfg.score.quantile, cfg.score.contamination)
    threshold = threshold_from_scores(loo, cfg.score.quantile, cfg.score.contamination)
    spec = get_spec(cfg.embed.backbone, cfg.embed.image_size)
    meta = {
        "backbone": spec.name, "image_size": spec.image_size, "weights": cfg.embed.weights,
        "weights_identity": weights_identity, "index_kind": cfg.index.kind, "n_shards": len(bc.shards),
        "n_normal": int(len(normal.X)), "n_reference": int(len(X)), "reduction": reduction,
        "k_requested": cfg.score.k, "threshold_quantile": q, "threshold_reliable": threshold_reliable(len(loo), q),
        "loo_score_quantiles": {str(p): float(np.quantile(loo, p)) for p in (0.5, 0.9, 0.99)},
        "dim": int(X.shape[1]),
        "normal_source": asdict(cfg.normal) if cfg.normal is not None else None,
        "normal_labels": sorted({int(v) for v in normal.extra["label"]}) if "label" in normal.extra else None,
    }
    model = FittedModel(ray.get(bc.shards), ids, k, threshold, meta, None if reduction else loo)
    return model, bc, loo_t
