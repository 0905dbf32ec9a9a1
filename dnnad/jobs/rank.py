"""The rank job (the paper's unsupervised setting): rank a set against itself, drop the worst, refit.

Writes ``ranking`` (every input row once), ``kept`` and ``dropped`` (a partition of the input), the
near-duplicate groups found in the first round's kNN search (``duplicates``) and the model refitted on the
kept rows.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..outputs import output_path
from ..sources import prepare_source
from ..storage import redact
from .base import Job, Run
from .embedding import embed_rows, resolve_job_weights

DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("round", pa.int32()),
                            ("score", pa.float64())])
RANKING_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
                            ("percentile", pa.float64()), ("neighbor_ids", pa.list_(pa.string())),
                            ("neighbor_dists", pa.list_(pa.float64())), ("status", pa.string()),
                            ("error", pa.string())])
DUPLICATES_SCHEMA = pa.schema([("group_id", pa.int64()), ("id", pa.string()), ("distance", pa.float64()),
                               ("group_size", pa.int64())])


def duplicates_table(ids: np.ndarray, groups) -> pa.Table:
    """One row per grouped image, by (group, position); ``distance`` to the group's first member."""
    rows = groups.members
    g = groups.group[rows]
    return pa.table({"group_id": pa.array(g), "id": pa.array(ids[rows].tolist(), pa.string()),
                     "distance": pa.array(groups.distance[rows]), "group_size": pa.array(groups.size[g])},
                    schema=DUPLICATES_SCHEMA)


def find_job_duplicates(data, fit, cfg):
    """Near-duplicate groups of the first round: its leave-one-out neighbours as candidates; equal content
    hashes (and, with --exclude-duplicates, whose copies the search skips, equal vectors) always group."""
    from ..core.dn2 import duplicate_groups
    from ..core.duplicates import find_duplicates

    same = [np.array(data.extra["hash"].tolist(), dtype="S64")] if "hash" in data.extra else []
    if cfg.score.exclude_duplicates or not same:  # a source of vectors: identical vectors are the copies
        same.append(duplicate_groups(data.X))
    return find_duplicates(data.X, fit.neighbour_pos, cfg.rank.duplicate_threshold, same)


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


def dropped_table(ids: np.ndarray, reason: str, rnd: int | None = None, scores: np.ndarray | None = None) -> pa.Table:
    """Rows of ``dropped``: ids with one reason, the round and score (null for error rows)."""
    n = len(ids)
    return pa.table({"id": pa.array(ids.tolist(), pa.string()), "reason": pa.array([reason] * n, pa.string()),
                     "round": pa.array([rnd] * n, pa.int32()), "score": pa.array(scores, pa.float64())
                     if scores is not None else pa.nulls(n, pa.float64())}, schema=DROPPED_SCHEMA)


def rows_to_drop(scores: np.ndarray, ids: np.ndarray, drop: float | None, drop_score: float | None) -> np.ndarray:
    """Positions dropped in one round: every score above ``drop_score``, or the worst ``drop`` fraction."""
    if drop_score is not None:
        return np.flatnonzero(scores > drop_score)
    n_drop = math.ceil((drop or 0.0) * len(scores))
    return np.sort(np.lexsort((ids.astype(str), -scores))[:n_drop])


class RankJob(Job):
    kind = "rank"

    @property
    def find_duplicates(self) -> bool:
        """Duplicates come from the leave-one-out search, which a --reduce fit does not run."""
        return self.cfg.rank.duplicates and not self.cfg.index.reduce

    def outputs(self) -> list[str]:
        return (["ranking", "kept", "dropped"] + (["duplicates"] if self.find_duplicates else [])
                + ([] if self.cfg.model_dir else ["model"]))

    def prepare(self) -> None:
        from ..core.model import ModelError, check_model_target

        self.cfg.check_fit_settings()
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
        from ..core.duplicates import EXTRA_NEIGHBOURS
        from ..core.model import save_model
        from ..stages.collect import collect
        from ..stages.fit import fit_model

        cfg, t, r = self.cfg, run.timings, self.cfg.rank
        with t.stage("embed data"):
            data = collect(embed_rows(self.data_src, cfg, run.weights_ref, hash_bytes=self.find_duplicates))
        if len(data.X) < 2:
            raise ConfigError(f"ranking needs at least 2 readable images, the data has {len(data.X)}")
        current, dropped, ranking, history, dups = data, [], None, [], None
        for rnd in range(1, r.rounds + 1):
            with t.stage(f"rank round {rnd}"):
                extra = EXTRA_NEIGHBOURS if self.find_duplicates and ranking is None else 0
                model, fit = fit_model(current, cfg, self.weights, extra_neighbours=extra)
                scores = fit.calibration_scores
                n_dup = 0
                if ranking is None:
                    ranking = rank_table(current.ids, scores, fit.ids[fit.calibration_pos], fit.calibration_dist,
                                         data.errors)
                    if self.find_duplicates:
                        dups = find_job_duplicates(data, fit, cfg)
                        run.staging.write_table("duplicates", duplicates_table(data.ids, dups))
                    if r.drop_duplicates and dups.n_groups:
                        gone = dups.redundant
                        n_dup = len(gone)
                        dropped.append(dropped_table(data.ids[gone], "duplicate", rnd, scores[gone]))
                        stay = np.setdiff1d(np.arange(len(scores)), gone)
                        current, scores = current.take(stay), scores[stay]
                        if len(stay) < 2:
                            raise ConfigError(f"--drop-duplicates leaves {len(stay)} distinct image; "
                                              "a model needs at least 2")
                out = rows_to_drop(scores, current.ids, r.drop, r.drop_score)
                history.append({"round": rnd, "rows": len(scores) + n_dup, "dropped": int(len(out)) + n_dup,
                                "threshold": model.threshold})
                if n_dup:
                    history[-1]["duplicates_dropped"] = n_dup
                if len(out) == 0 or len(scores) - len(out) < 2:
                    history[-1]["dropped"] = n_dup
                    break
                dropped.append(dropped_table(current.ids[out], "outlier", rnd, scores[out]))
                current = current.take(np.setdiff1d(np.arange(len(scores)), out))
        with t.stage("refit on kept rows"):
            model, _ = fit_model(current, cfg, self.weights)
            save_model(model, cfg.model_dir or run.staging.uri("model"), replace=cfg.overwrite)
        n_err = data.errors.num_rows
        dropped.append(dropped_table(np.asarray(data.errors["id"].to_pylist(), dtype=object), "error"))
        run.staging.write_table("ranking", ranking)
        run.staging.write_table("kept", pa.table({"id": pa.array(current.ids.tolist(), pa.string())}))
        run.staging.write_table("dropped", pa.concat_tables(dropped))
        run.fields.update(
            k=model.k, threshold=model.threshold, rounds=history, rows={"ok": len(data.X), "error": n_err},
            kept=len(current.ids), dropped=sum(d.num_rows for d in dropped), model=vars(model.meta),
            model_dir=redact(cfg.model_dir) or output_path(cfg.out, "model"), duplicates=duplicates_record(dups, cfg),
            outputs={n: output_path(cfg.out, n) for n in self.outputs() if n != "model"})


def duplicates_record(dups, cfg) -> dict:
    """The run record's duplicate counts (or why there are none)."""
    r = cfg.rank
    if not r.duplicates:
        return {"enabled": False}
    if dups is None:
        return {"enabled": False, "why": "--reduce replaces the leave-one-out search the groups come from"}
    return {"enabled": True, "threshold": r.duplicate_threshold, "groups": dups.n_groups,
            "rows_in_groups": int(dups.size.sum()), "largest_group": int(dups.size.max(initial=0)),
            "dropped": len(dups.redundant) if r.drop_duplicates else 0}


def run_rank(cfg) -> dict:
    return RankJob(cfg).run()
