"""The one job skeleton: validate → check the output → prepare (driver-side checks) → start Ray → stage →
work → record → commit, or abort and leave nothing. Score, rank and audit fill in only what is theirs."""
from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass, field

from .. import __version__
from ..config import JobConfig
from ..outputs import RUN_RECORD, OutDir, Staging
from ..runtime import Timings, cluster_resources, start_ray, stop_ray


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
        owned = start_ray(cfg.quiet, cfg.verbose)
        try:
            return self._staged(out)
        finally:
            if owned:  # a finished job leaves nothing running
                stop_ray()

    def _staged(self, out: OutDir) -> dict:
        import ray

        timings = Timings(self.cfg.quiet)
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
        except KeyboardInterrupt:  # stopped (Ctrl-C, SIGTERM): committed partitions stay for the same command
            raise
        except BaseException:
            staging.abort()
            raise

    def image_size(self) -> int | None:
        """The backbone's input size, None when the job reads vectors."""
        return self.cfg.embed.spec().image_size if self.weights is not None else None

    def runtime(self, gpus: int) -> dict:
        """What ran the network in the embedding actors, and its version."""
        from ..vision.specs import resolve_runtime, runtime_version

        name = resolve_runtime(self.cfg.embed.runtime, self.cfg.embed.spec(), gpus > 0 and self.cfg.embed.device != "cpu")
        return {"name": name, "version": runtime_version(name)}

    def record(self, run: Run) -> dict:
        cpus, gpus = cluster_resources()
        w = self.weights
        record = {
            "dnnad_version": __version__, "kind": self.kind,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "config": self.cfg.to_dict(),
            "backbone": self.cfg.embed.backbone if w else None, "weights": w.source if w else None,
            "weights_identity": w.identity if w else None, "runtime": self.runtime(gpus) if w else None,
            "cluster": {"cpus": cpus, "gpus": gpus, "host": platform.node()},
            **run.fields, "timings_s": dict(run.timings),
        }
        rows = run.fields.get("rows") or {}
        n_err, n_all = int(rows.get("error", 0)), int(sum(rows.values()))
        limit = self.cfg.max_error_fraction
        record["errors"] = {"rows": n_err, "of": n_all, "fraction": n_err / n_all if n_all else 0.0, "limit": limit,
                            "over_limit": limit is not None and n_all > 0 and n_err / n_all > limit}
        if w is not None and w.source == "none":
            record["warning"] = "RANDOM-INIT WEIGHTS (--weights none): scores are not meaningful; for tests only"
        return record
