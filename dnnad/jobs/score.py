"""The score job: fit on a normal set (or load ``--model``) and score a query set, one row per input row."""
from __future__ import annotations

from ..config import ConfigError
from ..outputs import output_path, status_counts
from ..sources import prepare_source
from ..storage import redact
from .base import Job, Run
from .embedding import embed_rows, resolve_job_weights
from .model_settings import apply_model, check_model_weights, load_saved_model


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
            cfg.check_fit_settings()
            if cfg.model_dir:
                try:
                    check_model_target(cfg.model_dir, replace=False)
                except ModelError as e:
                    raise ConfigError(f"--model {e}") from None
            self.normal_src = prepare_source(cfg.normal, "normal")
            if self.normal_src.rows < 2:
                raise ConfigError(f"--normal selects {self.normal_src.rows} image; DN2 needs at least 2 normal images")
        self.query_src = prepare_source(cfg.query, "query")
        if self.model is None and (cfg.normal.embedding_column is None) != (cfg.query.embedding_column is None):
            raise ConfigError("--embedding-column must name the vectors of both --normal and --query")
        if self.model is None and self.normal_src.dim != self.query_src.dim:
            raise ConfigError(f"--normal vectors have {self.normal_src.dim} dimensions, --query {self.query_src.dim}")
        if self.model is not None and self.query_src.dim not in (None, self.model.meta.query_dim):
            raise ConfigError(f"--query vectors have {self.query_src.dim} dimensions, the model "
                              f"{self.model.meta.query_dim}")
        self.weights = resolve_job_weights(cfg, cfg.normal if self.model is None else None, cfg.query)
        if self.model is not None:
            check_model_weights(self.model, self.weights)

    def work(self, run: Run) -> None:
        from ..core.model import is_model_dir, load_model, save_model
        from ..stages.collect import collect, pool_groups, pool_groups_dataset
        from ..stages.fit import fit_model, shared_vector_warnings
        from ..stages.score import Scorer
        from ..stages.write import write_partitioned

        cfg, t = self.cfg, run.timings
        grouped = bool(cfg.query.group_by)
        model, normal_rows, shard_refs = self.model, None, None
        staged = run.staging.uri("model") if not cfg.model_dir else None
        if model is None and staged and run.staging.resumed and is_model_dir(staged):
            model = load_model(staged)  # fitted and saved by the killed run we resume
        if model is None:
            with t.stage("embed normal"):
                embedded = embed_rows(self.normal_src, cfg, run.weights_ref)
                if cfg.embed.localize:  # read twice more by the patch bank's fit; the patches stay off the driver
                    embedded = embedded.materialize()
                normal = collect(embedded.drop_columns(["patches"]) if cfg.embed.localize else embedded)
            if len(normal.X) < 2:
                raise ConfigError(f"the normal set has {len(normal.X)} readable images; DN2 needs at least 2")
            normal_rows = {"ok": len(normal.X), "error": normal.errors.num_rows}
            with t.stage("fit index + threshold"):
                model, fit = fit_model(pool_groups(normal) if grouped else normal, cfg, self.weights)
                run.fields["warnings"] = shared_vector_warnings(normal.X, self.image_size())
                if cfg.embed.localize:  # the patch bank; the threshold becomes the maps'
                    from ..stages.localize import fit_bank

                    model = fit_bank(model, embedded, normal.ids, cfg)
                del embedded  # the normal patches leave the object store before the queries stream
                save_model(model, cfg.model_dir or run.staging.uri("model"))
                shard_refs = fit.handle  # the fitted shards, already in the object store
        scorer = Scorer.of(model, cfg.score, shard_refs=shard_refs)
        with t.stage("embed + score query"):
            if grouped:  # a group may span partitions: one pass
                query = embed_rows(self.query_src, cfg, run.weights_ref, score_actors=cfg.score.actors)
                scorer.map(pool_groups_dataset(query)).write_parquet(run.staging.path("scores"),
                                                                     filesystem=run.staging.fs)
                parts = {}
            else:
                parts = write_partitioned(run, "scores", self.query_src, lambda part: scorer.map(
                    embed_rows(part, cfg, run.weights_ref, score_actors=cfg.score.actors)))
        self.fitted = model
        run.fields.update(
            k=model.k, threshold=model.threshold, model=vars(model.meta),
            model_dir=redact(cfg.model_dir) or output_path(cfg.out, "model"),
            rows=status_counts(run.staging.fs, run.staging.path("scores")), normal_rows=normal_rows, grouped=grouped,
            **parts,
            outputs={"scores": output_path(cfg.out, "scores"), "report": output_path(cfg.out, "report.html")})

    def report(self, run: Run, record: dict) -> None:
        from ..report.html import run_report

        if not record["grouped"]:
            run.staging.write_text("report.html", run_report(record, run.staging.fs, run.staging.path("scores"),
                                                             self.fitted, self.cfg.query))


def run_score(cfg) -> dict:
    return ScoreJob(cfg).run()
