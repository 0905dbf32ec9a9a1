"""The rank job (the paper's unsupervised setting): rank a set against itself, drop the worst, refit.

Writes ``ranking`` (every input row once), ``kept`` and ``dropped`` (a partition of the input) and the
model refitted on the kept rows.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..stages.read import prepare_source
from .base import Job, Run, embed_rows, output_path, resolve_job_weights

DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("round", pa.int32()),
                            ("score", pa.float64())])
RANKING_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
                            ("percentile", pa.float64()), ("neighbor_ids", pa.list_(pa.string())),
                            ("neighbor_dists", pa.list_(pa.float64())), ("status", pa.string()),
                            ("error", pa.string())])


def rank_table(ids: np.ndarray, scores: np.ndarray, neighbor_ids: np.ndarray, neighbor_dists: np.ndarray,
               errors: pa.Table) -> pa.Table:
    """Ranking of a set against itself: rank 1 = most anomalous, percentile of each score; error rows last."""
    order = np.lexsort((ids.astype(str), -scores))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    pct = 100.0 * np.searchsorted(np.sort(scores), scores, side="right") / max(1, len(scores))
    n, k = neighbor_ids.shape
    ok = pa.table({
        "id": pa.array(ids.tolist(), pa.string()), "score": pa.array(scores, pa.float64()),
        "rank": pa.array(rank), "percentile": pa.array(pct),
        "neighbor_ids": pa.FixedSizeListArray.from_arrays(pa.array(neighbor_ids.ravel().tolist(), pa.string()), k)
        .cast(pa.list_(pa.string())),
        "neighbor_dists": pa.FixedSizeListArray.from_arrays(pa.array(neighbor_dists.ravel(), pa.float64()), k)
        .cast(pa.list_(pa.float64())),
        "status": pa.array(["ok"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
    }, schema=RANKING_SCHEMA)
    m = errors.num_rows
    bad = pa.table({
        "id": errors["id"], "score": pa.nulls(m, pa.float64()), "rank": pa.nulls(m, pa.int64()),
        "percentile": pa.nulls(m, pa.float64()), "neighbor_ids": pa.array([[]] * m, pa.list_(pa.string())),
        "neighbor_dists": pa.array([[]] * m, pa.list_(pa.float64())), "status": pa.array(["error"] * m, pa.string()),
        "error": errors["error"],
    }, schema=RANKING_SCHEMA)
    return pa.concat_tables([ok.take(order), bad])


def rows_to_drop(scores: np.ndarray, ids: np.ndarray, drop: float | None, drop_score: float | None) -> np.ndarray:
    """Positions dropped in one round: every score above ``drop_score``, or the worst ``drop`` fraction."""
    if drop_score is not None:
        return np.flatnonzero(scores > drop_score)
    n_drop = math.ceil((drop or 0.0) * len(scores))
    return np.sort(np.lexsort((ids.astype(str), -scores))[:n_drop])


class RankJob(Job):
    kind = "rank"

    def outputs(self) -> list[str]:
        return ["ranking", "kept", "dropped"] + ([] if self.cfg.model_dir else ["model"])

    def prepare(self) -> None:
        from ..core.model import ModelError, check_model_target

        if self.cfg.model_dir:
            try:
                check_model_target(self.cfg.model_dir, replace=self.cfg.overwrite)
            except ModelError as e:
                raise ConfigError(f"--model {e}") from None
        self.data_src = prepare_source(self.cfg.normal, "data")
        if self.data_src.rows < 2:
            raise ConfigError(f"--data selects {self.data_src.rows} image; ranking needs at least 2")
        self.weights = resolve_job_weights(self.cfg, self.cfg.normal)

    def work(self, run: Run) -> None:
        from ..core.model import save_model
        from ..stages.collect import collect
        from ..stages.fit import fit_model

        cfg, t, r = self.cfg, run.timings, self.cfg.rank
        with t.stage("embed data"):
            data = collect(embed_rows(self.data_src, cfg, run.weights_ref))
        if len(data.X) < 2:
            raise ConfigError(f"ranking needs at least 2 readable images, the data has {len(data.X)}")
        current, dropped, ranking, history = data, [], None, []
        for rnd in range(1, r.rounds + 1):
            with t.stage(f"rank round {rnd}"):
                model, fit = fit_model(current, cfg, self.weights)
                scores = fit.calibration_scores
                if ranking is None:
                    ranking = rank_table(current.ids, scores, fit.ids[fit.calibration_pos], fit.calibration_dist,
                                         data.errors)
                out = rows_to_drop(scores, current.ids, r.drop, r.drop_score)
                history.append({"round": rnd, "rows": len(scores), "dropped": int(len(out)),
                                "threshold": model.threshold})
                if len(out) == 0 or len(scores) - len(out) < 2:
                    history[-1]["dropped"] = 0
                    break
                dropped.append(pa.table({"id": pa.array(current.ids[out].tolist(), pa.string()),
                                         "reason": pa.array(["outlier"] * len(out), pa.string()),
                                         "round": pa.array([rnd] * len(out), pa.int32()),
                                         "score": pa.array(scores[out], pa.float64())}, schema=DROPPED_SCHEMA))
                current = current.take(np.setdiff1d(np.arange(len(scores)), out))
        with t.stage("refit on kept rows"):
            model, _ = fit_model(current, cfg, self.weights)
            save_model(model, cfg.model_dir or run.staging.uri("model"), replace=cfg.overwrite)
        n_err = data.errors.num_rows
        dropped.append(pa.table({"id": data.errors["id"], "reason": pa.array(["error"] * n_err, pa.string()),
                                 "round": pa.nulls(n_err, pa.int32()), "score": pa.nulls(n_err, pa.float64())},
                                schema=DROPPED_SCHEMA))
        run.staging.write_table("ranking", ranking)
        run.staging.write_table("kept", pa.table({"id": pa.array(current.ids.tolist(), pa.string())}))
        run.staging.write_table("dropped", pa.concat_tables(dropped))
        run.fields.update(
            k=model.k, threshold=model.threshold, rounds=history, rows={"ok": len(data.X), "error": n_err},
            kept=len(current.ids), dropped=sum(d.num_rows for d in dropped), model=vars(model.meta),
            model_dir=cfg.model_dir or output_path(cfg, "model"),
            outputs={n: output_path(cfg, n) for n in ("ranking", "kept", "dropped")})


def run_rank(cfg) -> dict:
    return RankJob(cfg).run()
