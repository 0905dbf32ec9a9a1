"""The score job: fit on a normal set (or load ``--model``) and score a query set, one row per input row."""
from __future__ import annotations

import os

from ..config import ConfigError
from ..stages.read import prepare_source, read_source
from .base import (
    Job,
    Run,
    apply_model,
    check_model_weights,
    load_saved_model,
    output_path,
    resolve_job_weights,
    status_counts,
)


class ScoreJob(Job):
    kind = "score"

    def outputs(self) -> list[str]:
        return ["scores", "report.html"] + ([] if self.cfg.model_dir else ["model"])

    def prepare(self) -> None:
        from ..core.model import ModelError, check_model_target, is_model_dir

        cfg = self.cfg
        self.model = load_saved_model(cfg.model_dir) if is_model_dir(cfg.model_dir) else None
        if self.model is not None:
            self.cfg = cfg = apply_model(cfg, self.model, frozenset(cfg.explicit))
        else:
            if cfg.normal is None:
                raise ConfigError("--normal is needed unless --model names a saved model")
            if cfg.model_dir:
                try:
                    check_model_target(cfg.model_dir, replace=False)
                except ModelError as e:
                    raise ConfigError(f"--model {e}") from None
            self.normal_src = prepare_source(cfg.normal, "normal")
            if self.normal_src.rows < 2:
                raise ConfigError(f"--normal selects {self.normal_src.rows} image; DN2 needs at least 2 normal images")
        self.query_src = prepare_source(cfg.query, "query")
        self.weights = resolve_job_weights(cfg)
        if self.model is not None:
            check_model_weights(self.model, self.weights)

    def work(self, run: Run) -> None:
        from ..core.model import save_model
        from ..stages.collect import as_dataset, collect, pool_groups
        from ..stages.embed import embed
        from ..stages.fit import fit_model
        from ..stages.score import Scorer

        cfg, t = self.cfg, run.timings
        grouped = bool(cfg.query.group_by)
        model, normal_rows = self.model, None
        if model is None:
            with t.stage("embed normal"):
                normal = collect(embed(read_source(self.normal_src), cfg.embed, run.weights_ref,
                                       cfg.normal.max_file_bytes))
            if len(normal.X) < 2:
                raise ConfigError(f"the normal set has {len(normal.X)} readable images; DN2 needs at least 2")
            normal_rows = {"ok": len(normal.X), "error": normal.errors.num_rows}
            with t.stage("fit index + threshold"):
                model, _ = fit_model(pool_groups(normal) if grouped else normal, cfg, self.weights.identity)
                save_model(model, cfg.model_dir or run.staging.path("model"))
        scorer = Scorer.of(model, cfg.score)
        with t.stage("embed + score query"):
            query = embed(read_source(self.query_src), cfg.embed, run.weights_ref, cfg.query.max_file_bytes,
                          score_actors=cfg.score.actors)
            if grouped:
                from ..runtime import cluster_resources

                q = pool_groups(collect(query))
                scored = scorer.map(as_dataset(q.ids, q.X, cluster_resources()[0], q.extra)).drop_columns(["_pos"])
            else:
                scored = scorer.map(query)
            scored.write_parquet(run.staging.path("scores"))
        self.fitted = model
        run.fields.update(
            k=model.k, threshold=model.threshold, model=vars(model.meta),
            model_dir=cfg.model_dir or output_path(cfg, "model"),
            rows=status_counts(os.path.join(run.staging.dir, "scores")), normal_rows=normal_rows, grouped=grouped,
            outputs={"scores": output_path(cfg, "scores"), "report": output_path(cfg, "report.html")})

    def report(self, run: Run, record: dict) -> None:
        from ..report.html import run_report

        if not record["grouped"]:
            run.staging.write_text("report.html", run_report(record, os.path.join(run.staging.dir, "scores"),
                                                             self.fitted, self.cfg.query))


def run_score(cfg) -> dict:
    return ScoreJob(cfg).run()
