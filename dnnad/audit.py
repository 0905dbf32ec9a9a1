"""Nightly bulk audit: a saved model, an embedding cache, a dated Parquet partition, a summary and a report.

    OUT/scores/run_date=YYYY-MM-DD/*.parquet   one row per image (hive-partitioned: pandas, DuckDB, Spark)
    OUT/runs/YYYY-MM-DD.json                   run record with the summary
    OUT/reports/YYYY-MM-DD.html                static report
    OUT/cache/...                              embeddings by content hash (or --cache DIR)
"""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .cache import EmbeddingCache, append_part, cache_dir
from .config import ConfigError, JobConfig
from .model_store import is_model_dir, load_model
from .pipeline import Broadcast, Timings, embed, knn_map, start_ray
from .report import run_report
from .runs import model_embed_config, model_weights, run_record, status_counts
from .sink import Staging, check_out_dir
from .sources import prepare_source, read_source


def previous_scores(out: str, run_date: str) -> tuple[str, np.ndarray] | None:
    """The latest earlier night's ok scores, if any."""
    root = os.path.join(out, "scores")
    if not os.path.isdir(root):
        return None
    dates = sorted(d.split("=", 1)[1] for d in os.listdir(root) if d.startswith("run_date="))
    earlier = [d for d in dates if d < run_date]
    if not earlier:
        return None
    t = pq.read_table(os.path.join(root, f"run_date={earlier[-1]}"), columns=["score", "status"])
    return earlier[-1], t.filter(pc.field("status") == "ok")["score"].to_numpy()


def summarise(scores: pa.Table, model_meta: dict, threshold: float, top_n: int,
              previous: tuple[str, np.ndarray] | None) -> dict:
    from scipy.stats import ks_2samp

    ok = scores.filter(pc.field("status") == "ok")
    s = ok["score"].to_numpy()
    qs = (0.5, 0.9, 0.99)
    summary = {
        "flagged": int((s > threshold).sum()), "flagged_fraction": float((s > threshold).mean()) if len(s) else 0.0,
        "score_quantiles": {str(q): float(np.quantile(s, q)) for q in qs} if len(s) else {},
        "normal_loo_quantiles": model_meta.get("loo_score_quantiles"),
        "top": [{"id": r["id"], "score": r["score"], "neighbor_ids": r["neighbor_ids"]}
                for r in ok.sort_by([("score", "descending"), ("id", "ascending")]).slice(0, top_n).to_pylist()],
    }
    if previous is not None and len(s) and len(previous[1]):
        ks = ks_2samp(s, previous[1])
        summary["drift"] = {"previous_run_date": previous[0], "ks_statistic": float(ks.statistic),
                            "ks_pvalue": float(ks.pvalue),
                            "median_shift": float(np.median(s) - np.median(previous[1]))}
    return summary


def run_audit(cfg: JobConfig, run_date: str | None = None, cache_root: str | None = None, top_n: int = 20) -> dict:
    """Score ``cfg.query`` with the saved model ``cfg.model_dir``, embedding only images not cached."""
    cfg.validate()
    run_date = run_date or dt.date.today().isoformat()
    try:
        dt.date.fromisoformat(run_date)
    except ValueError:
        raise ConfigError(f"--date must be YYYY-MM-DD, got {run_date!r}") from None
    if not is_model_dir(cfg.model_dir):
        raise ConfigError("the audit needs --model DIR holding a saved model (fit one with jobs/score.py --model DIR)")
    if cfg.query is None:
        raise ConfigError("--query is needed")
    record_name = os.path.join("runs", f"{run_date}.json")
    check_out_dir(cfg.out, cfg.overwrite, record_name)
    model = load_model(cfg.model_dir)
    cfg = model_embed_config(model, cfg)
    query_src = prepare_source(cfg.query, "query")
    weights = model_weights(model, cfg)
    cdir = cache_dir(cache_root or os.path.join(cfg.out, "cache"), model.meta["backbone"],
                     model.meta["image_size"], weights.identity)

    start_ray(cfg.quiet)
    import ray

    t = Timings()
    staging = Staging(cfg.out)
    try:
        cache = EmbeddingCache.load(cdir)
        with t.stage("embed query (cache-aware)", cfg.quiet):
            emb = embed(read_source(query_src), cfg.embed, ray.put(weights.state_dict), cache_ref=ray.put(cache))
        with t.stage("score", cfg.quiet):
            bc = Broadcast.of(model)
            scored = knn_map(emb.drop_columns(["hash", "cached"]), bc.shards, bc.ids, model.k, model.threshold,
                             cfg.score)
            part = f"scores/run_date={run_date}"
            scored.write_parquet(staging.path(part))
        new = emb.filter(expr=(ray.data.expressions.col("cached") == False) &  # noqa: E712
                         (ray.data.expressions.col("status") == "ok")).select_columns(["hash", "embedding"])
        new_t = [b for b in new.iter_batches(batch_size=None, batch_format="numpy")]
        hashes = [h for b in new_t for h in b["hash"].tolist()]
        X_new = np.concatenate([b["embedding"] for b in new_t]) if new_t else np.empty((0, 0))
        n_cached = sum(int(b["cached"].sum()) for b in emb.select_columns(["cached"]).iter_batches(
            batch_size=None, batch_format="numpy"))
        scores = pq.read_table(os.path.join(staging.dir, part))
        summary = summarise(scores, model.meta, model.threshold, top_n, previous_scores(cfg.out, run_date))
        summary.update({"embedded": len(hashes), "from_cache": n_cached, "cache_dir": cdir})
        record = run_record(cfg, "audit", weights, t, run_date=run_date, k=model.k, threshold=model.threshold,
                             model_dir=cfg.model_dir, rows=status_counts(os.path.join(staging.dir, part)),
                             summary=summary, outputs={"scores": os.path.join(cfg.out, part),
                                                       "report": os.path.join(cfg.out, "reports", f"{run_date}.html")})
        staging.write_text(os.path.join("reports", f"{run_date}.html"), run_report(record, scores, model, cfg.query, top_n))
        append_part(cdir, hashes, X_new)  # the cache may grow even if the commit below fails: it is content-keyed
        staging.commit(record, record_name)
        if not cfg.quiet:
            print_summary(record)
        return record
    except BaseException:
        staging.abort()
        raise


def print_summary(record: dict) -> None:
    s = record["summary"]
    print(f"[dnnad] audit {record['run_date']}: rows {record['rows']}, embedded {s['embedded']}, "
          f"from cache {s['from_cache']}, flagged {s['flagged']} ({s['flagged_fraction']:.2%})")
    if "drift" in s:
        d = s["drift"]
        print(f"[dnnad] drift vs {d['previous_run_date']}: KS {d['ks_statistic']:.3f} (p={d['ks_pvalue']:.3g}), "
              f"median shift {d['median_shift']:+.4f}")
    for r in s["top"][:10]:
        print(f"[dnnad]   {r['score']:.4f}  {r['id']}  nearest normal: {', '.join(r['neighbor_ids'])}")
