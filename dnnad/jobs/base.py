"""The one job skeleton: validate → check the output → prepare (driver-side checks) → start Ray → stage →
work → record → commit, or abort and leave nothing. Score, rank and audit fill in only what is theirs."""
from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import dataclass, field, replace

import pyarrow.compute as pc
import pyarrow.dataset as pads

from .. import __version__
from ..config import ConfigError, JobConfig
from ..runtime import Timings, cluster_resources, start_ray
from ..stages.read import read_source
from ..stages.write import RUN_RECORD, OutDir, Staging

# Flags a saved model decides; giving one that differs from the model is an error, never silently ignored.
MODEL_FLAGS = {"k": "--k", "shards": "--shards", "index": "--index", "reduce": "--reduce",
               "quantile": "--quantile", "contamination": "--contamination", "backbone": "--backbone",
               "weights": "--weights", "image_size": "--image-size", "normal": "--normal",
               "exclude_duplicates": "--exclude-duplicates", "layers": "--layers", "tta": "--tta",
               "resize": "--resize", "normalize": "--normalize", "whiten": "--whiten", "pca": "--pca",
               "approximate": "--approximate"}


@dataclass
class Run:
    """What a job's work sees: its configuration, the staging directory, stage timings and the weights."""

    cfg: JobConfig
    staging: Staging
    timings: Timings
    weights_ref: object = None
    fields: dict = field(default_factory=dict)  # what the job adds to its run record


class Job:
    """Subclasses set ``kind`` and implement ``outputs``, ``prepare`` and ``work``; ``report`` is optional."""

    kind = ""
    record_name = RUN_RECORD

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.weights = None  # vision.weights.ResolvedWeights, set by prepare

    def outputs(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Driver-side checks and resolution before Ray starts; raise ConfigError on anything wrong."""

    def work(self, run: Run) -> None:
        raise NotImplementedError

    def report(self, run: Run, record: dict) -> None:
        """Write what needs the finished record (the HTML report) into the staging directory."""

    def run(self) -> dict:
        cfg = self.cfg.validate()
        out = OutDir(cfg.out, self.outputs(), cfg.overwrite, self.record_name, fingerprint=cfg.fingerprint())
        out.check()
        self.prepare()
        self.cfg.validate()  # prepare may have taken settings from a saved model
        start_ray(cfg.quiet, cfg.verbose)
        import ray

        timings = Timings(cfg.quiet)
        staging = out.open()
        try:
            run = Run(self.cfg, staging, timings)
            if self.weights is not None:
                run.weights_ref = ray.put(self.weights.state_dict)
            if staging.resumed:
                timings.say("resuming a killed run of the same configuration from its committed partitions")
            self.work(run)
            record = self.record(run)
            self.report(run, record)
            staging.commit(record)
            return record
        except BaseException:
            staging.abort()
            raise

    def record(self, run: Run) -> dict:
        cpus, gpus = cluster_resources()
        w = self.weights
        record = {
            "dnnad_version": __version__, "kind": self.kind,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "config": self.cfg.to_dict(),
            "backbone": self.cfg.embed.backbone if w else None, "weights": w.source if w else None,
            "weights_identity": w.identity if w else None,
            "cluster": {"cpus": cpus, "gpus": gpus, "host": platform.node()},
            **run.fields, "timings_s": dict(run.timings),
        }
        if w is not None and w.source == "none":
            record["warning"] = "RANDOM-INIT WEIGHTS (--weights none): scores are not meaningful; for tests only"
        return record


def embed_rows(src, cfg: JobConfig, weights_ref, score_actors: int | None = None, cache_ref=None,
               cache_out: str | None = None, hash_bytes: bool = False):
    """The embed stage for a prepared source (lazy): the backbone on image rows, or checked vectors for an
    ``--embedding-column`` source."""
    if src.cfg.embedding_column:
        from ..stages.vectors import vectors

        return vectors(read_source(src), src.dim)
    from ..stages.embed import embed

    return embed(read_source(src), cfg.embed, weights_ref, src.cfg.max_file_bytes, cache_ref=cache_ref,
                 score_actors=score_actors, cache_out=cache_out, hash_bytes=hash_bytes)


def uses_images(*sources) -> bool:
    return any(s is not None and not s.embedding_column for s in sources)


def resolve_job_weights(cfg: JobConfig, *sources):
    """The embedding weights, resolved once on the driver (then broadcast); ``--layers`` names are checked.
    None when every source already holds vectors."""
    from ..vision.backbones import build_classifier, strip_head, tap_modules
    from ..vision.weights import WeightsError, resolve_weights

    if sources and not uses_images(*sources):
        return None
    spec = cfg.embed.spec()

    try:
        if spec.layers:
            tap_modules(strip_head(build_classifier(spec), spec), spec)
        return resolve_weights(spec, cfg.embed.weights)
    except (WeightsError, ValueError) as e:
        raise ConfigError(str(e)) from None


def load_saved_model(path: str):
    from ..core.model import ModelError, load_model

    try:
        return load_model(path)
    except ModelError as e:
        raise ConfigError(f"--model: {e}") from None


def apply_model(cfg: JobConfig, model, explicit: frozenset[str]) -> JobConfig:
    """A saved model decides the embedding, feature and index settings: refuse flags that contradict it,
    and embed with the model's backbone, weights, image size, layers, TTA and resize."""
    m = model.meta
    layers = tuple(m.layers or ())
    decided = {"k": m.k_requested, "shards": m.n_shards, "index": m.index_kind, "backbone": m.backbone,
               "weights": m.weights, "image_size": m.image_size, "layers": layers, "tta": m.tta,
               "resize": m.resize, "normalize": m.normalize, "whiten": m.whiten, "pca": m.pca,
               "approximate": m.approximate}
    current = {"k": cfg.score.k, "shards": cfg.index.shards, "index": cfg.index.kind,
               "backbone": cfg.embed.backbone, "weights": cfg.embed.weights, "image_size": cfg.embed.image_size,
               "layers": cfg.embed.layers, "tta": cfg.embed.tta, "resize": cfg.embed.resize,
               "normalize": cfg.features.normalize, "whiten": cfg.features.whiten, "pca": cfg.features.pca,
               "approximate": cfg.index.approximate}
    for name in sorted(explicit & set(MODEL_FLAGS)):
        if name in decided and current[name] == decided[name]:
            continue
        model_value = f" (the model has {decided[name]})" if name in decided else ""
        raise ConfigError(f"{MODEL_FLAGS[name]} conflicts with the saved model in --model{model_value}: "
                          f"drop the flag, or fit a new model into a new --model directory")
    if m.backbone is None:
        if uses_images(cfg.query):
            raise ConfigError("--model holds a model fitted on precomputed embeddings; score a source with "
                              "--embedding-column")
        return replace(cfg, features=replace(cfg.features, normalize=m.normalize, whiten=m.whiten, pca=m.pca),
                       index=replace(cfg.index, kind=m.index_kind, shards=m.n_shards, approximate=m.approximate))
    if cfg.query is not None and cfg.query.embedding_column:
        raise ConfigError("--model was fitted on images; --embedding-column vectors cannot be scored against it")
    return replace(cfg, embed=replace(cfg.embed, backbone=m.backbone, weights=m.weights, image_size=m.image_size,
                                      layers=layers, tta=m.tta, resize=m.resize),
                   features=replace(cfg.features, normalize=m.normalize, whiten=m.whiten, pca=m.pca),
                   index=replace(cfg.index, kind=m.index_kind, shards=m.n_shards, approximate=m.approximate))


def check_model_weights(model, weights) -> None:
    """Refuse weights whose file changed since the model was fitted."""
    if weights is not None and weights.identity != model.meta.weights_identity:
        raise ConfigError(f"weights {weights.identity} differ from the model's {model.meta.weights_identity}")


MIN_ROWS_PER_FILE = 65_536  # output rows per Parquet file (blocks are smaller: a file per block would be tiny)


def write_partitioned(run: Run, name: str, src, scored_of) -> dict:
    """Write output ``name`` partition by partition of ``src`` (``scored_of(part)`` is the lazy scored
    dataset of one partition), each committed by a marker; partitions a killed run committed are kept."""
    from ray.data.datasource import FilenameProvider

    from ..stages.read import partitions

    parts = partitions(src, run.cfg.score.rows_per_partition(bool(src.cfg.embedding_column)))
    log = run.staging.partitions(name)
    skipped = 0
    for i, part in enumerate(parts):
        if log.done(i):
            skipped += 1
            continue
        prefix = log.start(i)
        scored_of(part).write_parquet(run.staging.path(name), filesystem=run.staging.fs,
                                      min_rows_per_file=MIN_ROWS_PER_FILE,
                                      filename_provider=FilenameProvider(dataset_uuid=prefix, file_format="parquet"))
        log.finish(i)
    log.clear_markers()
    return {"partitions": len(parts), "partitions_resumed": skipped}


def status_counts(fs, path: str) -> dict:
    """Rows per status of a written table, streaming only its status column."""
    total: dict[str, int] = {}
    for batch in pads.dataset(path, format="parquet", filesystem=fs).to_batches(columns=["status"],
                                                                                batch_size=65_536):
        for c in pc.value_counts(batch.column(0)).to_pylist():
            total[c["values"]] = total.get(c["values"], 0) + c["counts"]
    return dict(sorted(total.items()))


def output_path(cfg: JobConfig, name: str) -> str:
    return cfg.out.rstrip("/") + "/" + name if "://" in cfg.out else os.path.join(cfg.out, name)
