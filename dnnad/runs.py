"""Whole runs: validate everything first, then fit / score / rank, then commit outputs atomically."""
from __future__ import annotations

import datetime as dt
import math
import os
import platform
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .backbones import get_spec
from .config import ConfigError, JobConfig
from .model_store import FittedModel, is_model_dir, load_model, save_model
from .pipeline import (Broadcast, Embedded, Timings, cluster_resources, collect, embed, embedded_dataset, fit,
                       knn_map, start_ray)
from .report import run_report
from .sink import Staging, check_out_dir
from .sources import PreparedSource, prepare_source, read_source
from .weights import ResolvedWeights, WeightsError, resolve_weights


def job_weights(cfg: JobConfig) -> ResolvedWeights:
    try:
        return resolve_weights(get_spec(cfg.embed.backbone, cfg.embed.image_size), cfg.embed.weights)
    except WeightsError as e:
        raise ConfigError(str(e)) from None


def pool_groups(emb: Embedded) -> Embedded:
    """Group anomaly detection: one mean embedding per group key, with its member count."""
    if "group" not in emb.extra:
        raise ConfigError("--group-by needs a group column on both the normal and the query source")
    keys = emb.extra["group"].astype(str)
    uniq, inv = np.unique(keys, return_inverse=True)
    X = np.zeros((len(uniq), emb.X.shape[1]), dtype=np.float64)
    np.add.at(X, inv, emb.X)
    counts = np.bincount(inv, minlength=len(uniq))
    X = (X / counts[:, None]).astype(np.float32)
    return Embedded(uniq.astype(object), X, {"n_members": counts}, emb.errors)


def _embed_source(src: PreparedSource, role: str, cfg: JobConfig, weights_ref, t: Timings):
    with t.stage(f"embed {role}", cfg.quiet):
        return embed(read_source(src), cfg.embed, weights_ref)


def run_record(cfg: JobConfig, kind: str, weights: ResolvedWeights, t: Timings, **fields) -> dict:
    cpus, gpus = cluster_resources()
    record = {
        "dnnad_version": __version__, "kind": kind, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": cfg.to_dict(), "backbone": cfg.embed.backbone, "weights": weights.source,
        "weights_identity": weights.identity, "cluster": {"cpus": cpus, "gpus": gpus, "host": platform.node()},
        **fields, "timings_s": dict(t),
    }
    if weights.source == "none":
        record["warning"] = "RANDOM-INIT WEIGHTS (--weights none): scores are not meaningful; for tests only"
    return record


def status_counts(path: str) -> dict:
    status = pq.read_table(path, columns=["status"])["status"].to_pylist()
    return {s: status.count(s) for s in sorted(set(status))}


def model_embed_config(model: FittedModel, cfg: JobConfig) -> JobConfig:
    """Scoring with a saved model embeds with the model's backbone and weights, never others."""
    m = model.meta
    return replace(cfg, embed=replace(cfg.embed, backbone=m["backbone"], weights=m["weights"],
                                      image_size=m["image_size"]))


def model_weights(model: FittedModel, cfg: JobConfig) -> ResolvedWeights:
    """The model's weights, resolved again; refuses files that changed since the model was fitted."""
    weights = job_weights(cfg)
    if weights.identity != model.meta["weights_identity"]:
        raise ConfigError(f"weights {weights.identity} differ from the model's {model.meta['weights_identity']}")
    return weights


def run_score(cfg: JobConfig) -> dict:
    """Fit on ``cfg.normal`` (or load ``cfg.model_dir``) and score ``cfg.query``; returns the run record."""
    cfg.validate()
    check_out_dir(cfg.out, cfg.overwrite)
    model = load_model(cfg.model_dir) if is_model_dir(cfg.model_dir) else None
    if model is not None:
        cfg = model_embed_config(model, cfg)
    elif cfg.normal is None:
        raise ConfigError("--normal is needed unless --model names a saved model")
    if cfg.query is None:
        raise ConfigError("--query is needed")
    grouped = bool(cfg.query.group_by)
    normal_src = prepare_source(cfg.normal, "normal") if model is None else None
    query_src = prepare_source(cfg.query, "query")
    weights = job_weights(cfg) if model is None else model_weights(model, cfg)

    start_ray(cfg.quiet)
    import ray

    t = Timings()
    weights_ref = ray.put(weights.state_dict)
    staging = Staging(cfg.out)
    try:
        counts_normal = None
        if model is None:
            normal_ds = _embed_source(normal_src, "normal", cfg, weights_ref, t)
            with t.stage("fit index + threshold", cfg.quiet):
                normal = collect(normal_ds)
                counts_normal = {"ok": len(normal.X), "error": normal.errors.num_rows}
                if grouped:
                    normal = pool_groups(normal)
                model, bc, _ = fit(normal, cfg, weights.identity)
            model_dir = cfg.model_dir or staging.path("model")
            save_model(model, model_dir)
        else:
            bc = Broadcast.of(model)
        query_ds = _embed_source(query_src, "query", cfg, weights_ref, t)
        with t.stage("score", cfg.quiet):
            cpus, _ = cluster_resources()
            if grouped:
                q = pool_groups(collect(query_ds))
                scored = knn_map(embedded_dataset(q.ids, q.X, cpus, q.extra), bc.shards, bc.ids, model.k,
                                 model.threshold, cfg.score).drop_columns(["_pos"])
            else:
                scored = knn_map(query_ds, bc.shards, bc.ids, model.k, model.threshold, cfg.score)
            scored.write_parquet(staging.path("scores"))
        counts = status_counts(os.path.join(staging.dir, "scores"))
        record = run_record(
            cfg, "score", weights, t, k=model.k, threshold=model.threshold, model=model.meta,
            model_dir=cfg.model_dir or os.path.join(cfg.out, "model"), rows=counts,
            normal_rows=counts_normal, grouped=grouped,
            outputs={"scores": os.path.join(cfg.out, "scores"), "report": os.path.join(cfg.out, "report.html")})
        if not grouped:
            scores = pq.read_table(os.path.join(staging.dir, "scores"))
            staging.write_text("report.html", run_report(record, scores, model, cfg.query))
        staging.commit(record)
        return record
    except BaseException:
        staging.abort()
        raise


def rank_table(loo: pa.Table, errors: pa.Table) -> pa.Table:
    """Ranking of a set against itself: rank 1 = most anomalous, percentile of each score; error rows last."""
    scores = loo["score"].to_numpy()
    ids = np.asarray(loo["id"].to_pylist(), dtype=object)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], ids[i]))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    sorted_scores = np.sort(scores)
    pct = 100.0 * np.searchsorted(sorted_scores, scores, side="right") / max(1, len(scores))
    ok = pa.table({
        "id": loo["id"], "score": loo["score"], "rank": pa.array(rank), "percentile": pa.array(pct),
        "neighbor_ids": loo["neighbor_ids"], "neighbor_dists": loo["neighbor_dists"],
        "status": loo["status"], "error": loo["error"],
    })
    n = errors.num_rows
    bad = pa.table({
        "id": errors["id"], "score": pa.nulls(n, pa.float64()), "rank": pa.nulls(n, pa.int64()),
        "percentile": pa.nulls(n, pa.float64()), "neighbor_ids": pa.array([[]] * n, pa.list_(pa.string())),
        "neighbor_dists": pa.array([[]] * n, pa.list_(pa.float64())), "status": pa.array(["error"] * n),
        "error": errors["error"],
    }).cast(ok.schema)
    return pa.concat_tables([ok.take(np.argsort(rank)), bad])


def run_rank(cfg: JobConfig, drop: float | None = None, drop_score: float | None = None, rounds: int = 1) -> dict:
    """Unsupervised setting: rank ``cfg.normal`` against itself, drop the worst, refit; write all three."""
    cfg.validate()
    if drop is not None and not 0.0 <= drop < 1.0:
        raise ConfigError(f"--drop must be in [0, 1), got {drop}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if cfg.normal is None:
        raise ConfigError("--data is needed")
    check_out_dir(cfg.out, cfg.overwrite)
    data_src = prepare_source(cfg.normal, "data")
    weights = job_weights(cfg)

    start_ray(cfg.quiet)
    import ray

    t = Timings()
    staging = Staging(cfg.out)
    try:
        data = collect(_embed_source(data_src, "data", cfg, ray.put(weights.state_dict), t))
        if len(data.X) < 2:
            raise ConfigError("ranking needs at least 2 readable images")
        current, dropped, ranking, history = data, [], None, []
        for r in range(1, rounds + 1):
            with t.stage(f"rank round {r}", cfg.quiet):
                model, _, loo = fit(current, cfg, weights.identity)
                if ranking is None:
                    ranking = rank_table(loo, data.errors)
                scores = loo["score"].to_numpy()
                if drop_score is not None:
                    out = np.flatnonzero(scores > drop_score)
                else:
                    n_drop = math.ceil((drop or 0.0) * len(scores))
                    out = np.array(sorted(range(len(scores)), key=lambda i: (-scores[i], current.ids[i]))[:n_drop],
                                   dtype=np.int64)
                history.append({"round": r, "rows": len(scores), "dropped": int(len(out)),
                                "threshold": model.threshold})
                if len(out) == 0 or len(scores) - len(out) < 2:
                    break
                dropped.append(pa.table({"id": pa.array(current.ids[out].tolist(), pa.string()),
                                         "reason": pa.array(["outlier"] * len(out)),
                                         "round": pa.array([r] * len(out), pa.int32()),
                                         "score": pa.array(scores[out], pa.float64())}))
                keep = np.setdiff1d(np.arange(len(scores)), out)
                current = Embedded(current.ids[keep], current.X[keep],
                                   {c: v[keep] for c, v in current.extra.items()}, current.errors)
        with t.stage("refit on kept rows", cfg.quiet):
            model, _, _ = fit(current, cfg, weights.identity)
            save_model(model, cfg.model_dir or staging.path("model"))
        n_err = data.errors.num_rows
        dropped.append(pa.table({"id": data.errors["id"], "reason": pa.array(["error"] * n_err),
                                 "round": pa.nulls(n_err, pa.int32()), "score": pa.nulls(n_err, pa.float64())}))
        staging.write_table("ranking", ranking)
        staging.write_table("kept", pa.table({"id": pa.array(current.ids.tolist(), pa.string())}))
        staging.write_table("dropped", pa.concat_tables(dropped))
        record = run_record(
            cfg, "rank", weights, t, k=model.k, rounds=history, rows={"ok": len(data.X), "error": n_err},
            kept=len(current.ids), dropped=sum(d.num_rows for d in dropped), model=model.meta,
            outputs={n: os.path.join(cfg.out, n) for n in ("ranking", "kept", "dropped")})
        staging.commit(record)
        return record
    except BaseException:
        staging.abort()
        raise
