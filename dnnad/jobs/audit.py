"""The nightly audit job: a saved model, an embedding cache, a dated Parquet partition, a summary and a report.

    OUT/scores/run_date=YYYY-MM-DD/*.parquet   one row per image (hive-partitioned: pandas, DuckDB, Spark)
    OUT/runs/YYYY-MM-DD.json                   run record with the summary (its presence: the night finished)
    OUT/reports/YYYY-MM-DD.html                static report
    OUT/cache/...                              embeddings by content hash (or --cache DIR)
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..config import ConfigError
from ..outputs import output_path, read_record, status_counts
from ..sources import prepare_source
from .base import Job, Run
from .embedding import embed_rows, resolve_job_weights
from .model_settings import apply_model, check_model_weights, load_saved_model


def previous_scores(out: str, run_date: str) -> tuple[str, np.ndarray] | None:
    """The latest earlier finished night's ok scores, if any (reads two columns)."""
    fs, root = storage.resolve(out)
    runs = storage.join(root, "runs")
    dates = sorted(f[:-5] for f in storage.listdir(fs, runs)
                   if f.endswith(".json") and f[:-5] < run_date and read_record(fs, storage.join(runs, f)))
    part = storage.join(root, "scores", f"run_date={dates[-1]}") if dates else None
    if part is None or not storage.exists(fs, part):
        return None
    t = pq.read_table(part, columns=["score", "status"], filesystem=fs)
    return dates[-1], t.filter(pc.field("status") == "ok")["score"].to_numpy()


def summarise(fs, scores_path: str, model, top_n: int, previous: tuple[str, np.ndarray] | None) -> dict:
    """Counts, quantiles against the normal set's, top-N and drift, reading only the columns needed."""
    from scipy.stats import ks_2samp

    t = pq.read_table(scores_path, columns=["id", "score", "status"], filesystem=fs)
    ok = t.filter(pc.field("status") == "ok")
    s = ok["score"].to_numpy()
    top_ids = ok.sort_by([("score", "descending"), ("id", "ascending")]).slice(0, top_n)["id"]
    peaks = ["peak_x", "peak_y"] if model.meta.localize else []  # where each top image is anomalous
    top = pq.read_table(scores_path, columns=["id", "score", "normal_percentile", "neighbor_ids", *peaks],
                        filesystem=fs, filters=pc.field("id").isin(top_ids))
    top = top.sort_by([("score", "descending"), ("id", "ascending")])
    qs = (0.5, 0.9, 0.99)
    flagged = s > model.threshold
    summary = {
        "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()) if len(s) else 0.0,
        "score_quantiles": {str(q): float(np.quantile(s, q)) for q in qs} if len(s) else {},
        "normal_loo_quantiles": model.meta.loo_score_quantiles,
        "top": top.to_pylist(),
    }
    if previous is not None and len(s) and len(previous[1]):
        ks = ks_2samp(s, previous[1])
        summary["drift"] = {"previous_run_date": previous[0], "ks_statistic": float(ks.statistic),
                            "ks_pvalue": float(ks.pvalue),
                            "median_shift": float(np.median(s) - np.median(previous[1]))}
    return summary


class AuditJob(Job):
    kind = "audit"

    @property
    def record_name(self) -> str:
        return os.path.join("runs", f"{self.cfg.run_date}.json")

    def outputs(self) -> list[str]:
        d = self.cfg.run_date
        return [f"scores/run_date={d}", f"reports/{d}.html"]

    def prepare(self) -> None:
        from ..core.model import is_model_dir
        from ..stages.cache import cache_dir, check_cache_root

        cfg = self.cfg
        if not is_model_dir(cfg.model_dir):
            raise ConfigError(f"--model {cfg.model_dir} holds no saved dnnad model "
                              f"(fit one with the score job: dnnad score ... --model DIR)")
        self.model = load_saved_model(cfg.model_dir)
        self.cfg = cfg = apply_model(cfg, self.model, frozenset(cfg.explicit))
        self.query_src = prepare_source(cfg.query, "query")
        self.weights = resolve_job_weights(cfg, cfg.query)
        check_model_weights(self.model, self.weights)
        self.cache_dir = None
        if self.weights is None or self.model.meta.localize:
            return  # vectors: nothing to embed; maps need patch grids, which the embedding cache does not hold
        if cfg.audit.cache is None and "://" in cfg.out:
            raise ConfigError("--out is on an object store: give the embedding cache a local or shared path with --cache")
        root = cfg.audit.cache or os.path.join(cfg.out, "cache")
        try:
            check_cache_root(root)
        except ValueError as e:
            raise ConfigError(f"--cache {e}") from None
        m = self.model.meta
        self.cache_dir = cache_dir(root, m.backbone, m.image_size, self.weights.identity, cfg.embed.spec().feature_tag)

    def work(self, run: Run) -> None:
        import ray

        from ..stages.cache import EmbeddingCache
        from ..stages.score import Scorer
        from ..stages.write import write_partitioned

        cfg, t, d = self.cfg, run.timings, self.cfg.run_date
        part = f"scores/run_date={d}"
        images = self.weights is not None
        cached = self.cache_dir is not None
        with t.stage("embed (cache-aware) + score"):
            cache = ray.put(EmbeddingCache.load(self.cache_dir)) if cached else None
            scorer = Scorer.of(self.model, cfg.score)
            parts = write_partitioned(run, part, self.query_src, lambda src: scorer.map(embed_rows(
                src, cfg, run.weights_ref, score_actors=cfg.score.actors, cache_ref=cache,
                cache_out=self.cache_dir)))
        fs, path = run.staging.fs, run.staging.path(part)
        summary = summarise(fs, path, self.model, cfg.audit.top, previous_scores(cfg.out, d))
        if images and not cached:  # --localize: every image embedded (its patch grid is needed)
            ok = pc.equal(pq.read_table(path, columns=["status"], filesystem=fs)["status"], "ok")
            summary.update({"embedded": int(pc.sum(ok).as_py() or 0), "from_cache": 0, "cache_dir": None})
        elif images:
            t_cached = pq.read_table(path, columns=["status", "cached"], filesystem=fs)
            ok = pc.equal(t_cached["status"], "ok")
            n_cached = int(pc.sum(pc.and_(ok, t_cached["cached"])).as_py() or 0)
            summary.update({"embedded": int(pc.sum(ok).as_py() or 0) - n_cached, "from_cache": n_cached,
                            "cache_dir": storage.redact(self.cache_dir)})
        run.fields.update(run_date=d, k=self.model.k, threshold=self.model.threshold, model_dir=storage.redact(cfg.model_dir),
                          rows=status_counts(fs, path), summary=summary, **parts,
                          outputs={"scores": output_path(cfg.out, part), "report": output_path(cfg.out, f"reports/{d}.html")})

    def report(self, run: Run, record: dict) -> None:
        from ..report.html import run_report

        d = self.cfg.run_date
        run.staging.write_text(f"reports/{d}.html", run_report(
            record, run.staging.fs, run.staging.path(f"scores/run_date={d}"), self.model, self.cfg.query,
            self.cfg.audit.top))
        if not self.cfg.quiet:
            print_summary(record)


def print_summary(record: dict) -> None:
    s = record["summary"]
    print(f"[dnnad] audit {record['run_date']}: rows {record['rows']}, embedded {s.get('embedded')}, "
          f"from cache {s.get('from_cache')}, flagged {s['flagged']} ({s['flagged_fraction']:.2%})")
    if "drift" in s:
        d = s["drift"]
        print(f"[dnnad] drift vs {d['previous_run_date']}: KS {d['ks_statistic']:.3f} (p={d['ks_pvalue']:.3g}), "
              f"median shift {d['median_shift']:+.4f}")
    for r in s["top"][:10]:
        where = f"  peak at ({r['peak_x']}, {r['peak_y']})" if r.get("peak_x") is not None else ""
        print(f"[dnnad]   {r['score']:.4f}  {r['id']}{where}  nearest normal: {', '.join(r['neighbor_ids'])}")


def run_audit(cfg) -> dict:
    return AuditJob(cfg).run()
