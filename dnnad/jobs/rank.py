"""The rank job (the paper's unsupervised setting): rank a set against itself, drop the worst, refit.

Writes ``ranking`` (every input row once), ``kept`` and ``dropped`` (a partition of the input), the
near-duplicate groups found in the first round's kNN search (``duplicates``) and the model refitted on the
kept rows.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..core.labels import label_names, label_rows
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


def find_job_duplicates(data, fit, cfg, prints: np.ndarray | None):
    """Near-duplicate groups of the first round: its leave-one-out neighbours, and each image's nearest
    fingerprints, as candidates, verified by the ratio test and the images' fingerprints; equal content hashes
    (and, with --exclude-duplicates, whose copies the search skips, equal vectors) always group."""
    from ..core.dn2 import duplicate_groups
    from ..core.duplicates import find_duplicates, fingerprint_neighbours
    from ..stages.fit import fit_params, search_backend
    from ..stages.verify import parallel_similarity

    same = [np.array(data.extra["hash"].tolist(), dtype="S64")] if "hash" in data.extra else []
    if cfg.score.exclude_duplicates or not same:  # a source of vectors: identical vectors are the copies
        same.append(duplicate_groups(data.X))
    more = None if prints is None else fingerprint_neighbours(
        prints, backend=search_backend(cfg, len(prints)), n_shards=fit_params(cfg).n_shards)
    return find_duplicates(data.X, fit.neighbour_pos, prints, cfg.rank.duplicate_ratio,
                           cfg.rank.duplicate_similarity, same, similarity=parallel_similarity, more=more)


LABEL_FIELDS = [("label", pa.string()), ("voter_ids", pa.list_(pa.string())), ("neighbor_labels", pa.list_(pa.string())),
                ("label_agreement", pa.float64()), ("label_score", pa.float64()),
                ("suggested_label", pa.string()), ("suspect", pa.bool_())]


def percentiles(scores: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Percentile of each score among the scores (of its label, with ``groups``: label names, None for none);
    NaN scores get NaN."""
    pct = np.full(len(scores), np.nan)
    scored = ~np.isnan(scores)
    parts = [np.arange(len(scores))] if groups is None else [rows for _, rows in label_rows(groups)]
    for rows in parts:
        rows = rows[scored[rows]]
        pct[rows] = 100.0 * np.searchsorted(np.sort(scores[rows]), scores[rows], side="right") / max(len(rows), 1)
    return pct


def ragged(values: np.ndarray, keep: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Row-wise lists of the entries of ``values`` (n, k) where ``keep`` (n, k) holds, built without a
    per-row loop (a label smaller than k + 1 rows leaves missing neighbours)."""
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep], type_.value_type)).cast(type_)


def take_lists(values: pa.Array, pos: np.ndarray) -> pa.ListArray:
    """Row-wise lists of ``values`` at ``pos`` (n, c), -1 entries left out: Arrow takes the strings, so no
    Python object is made per entry."""
    keep = pos >= 0
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(pos[keep])))


RANK_ROWS = 65_536  # ranking rows built and written at a time


def ranking_schema(labelled: bool) -> pa.Schema:
    return pa.schema(list(RANKING_SCHEMA) + (LABEL_FIELDS if labelled else []))


def rank_tables(ids: np.ndarray, scores: np.ndarray, neighbor_ids: np.ndarray, neighbor_dists: np.ndarray,
                errors: pa.Table, labels: LabelColumns | None = None, rows: int = RANK_ROWS) -> Iterator[pa.Table]:
    """The ranking of a set against itself, in slices of ``rows`` rows to stream to Parquet: rank 1 = most
    anomalous, percentile of each score; with ``labels``, scores and percentiles are within each label, rows
    are ranked by percentile, and the label review's columns are added. Unscored rows (alone in their
    label), then error rows, come last."""
    pct = percentiles(scores, labels.label if labels is not None else None)
    first_key = -np.nan_to_num(pct if labels is not None else scores, nan=-np.inf)
    order = np.lexsort((ids.astype(str), -np.nan_to_num(scores, nan=-np.inf), first_key))
    schema = ranking_schema(labels is not None)
    id_values = pa.array(ids.tolist(), pa.string())
    names = pa.array(labels.label.tolist(), pa.string()) if labels is not None else None
    for start in range(0, len(order), rows):
        o = order[start:start + rows]  # these rows, in ranking order
        n = len(o)
        cols = {
            "id": id_values.take(pa.array(o)), "score": pa.array(scores[o], pa.float64(), from_pandas=True),
            "rank": pa.array(np.arange(start + 1, start + n + 1, dtype=np.int64)),
            "percentile": pa.array(pct[o], from_pandas=True),
            "neighbor_ids": ragged(neighbor_ids[o], neighbor_ids[o] != None, pa.list_(pa.string())),  # noqa: E711
            "neighbor_dists": ragged(neighbor_dists[o], ~np.isnan(neighbor_dists[o]), pa.list_(pa.float64())),
            "status": pa.array(["ok"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
        }
        if labels is not None:
            known = labels.known[o]
            cols.update({
                "label": names.take(pa.array(o)), "voter_ids": take_lists(id_values, labels.voter_pos[o]),
                "neighbor_labels": take_lists(names, labels.voter_pos[o]),
                "label_agreement": pa.array(np.where(known, labels.agreement[o], np.nan), from_pandas=True),
                "label_score": pa.array(np.where(known, labels.score[o], np.nan), from_pandas=True),
                "suggested_label": pa.array(labels.suggested[o].tolist(), pa.string()),
                "suspect": pa.array(np.where(known, labels.suspect[o], None).tolist(), pa.bool_())})
        yield pa.table(cols, schema=schema)
    m = errors.num_rows
    yield pa.table({
        "id": errors["id"], "score": pa.nulls(m, pa.float64()), "rank": pa.nulls(m, pa.int64()),
        "percentile": pa.nulls(m, pa.float64()), "neighbor_ids": pa.array([[]] * m, pa.list_(pa.string())),
        "neighbor_dists": pa.array([[]] * m, pa.list_(pa.float64())), "status": pa.array(["error"] * m, pa.string()),
        "error": errors["error"], **{name: pa.nulls(m, typ) for name, typ in (LABEL_FIELDS if labels is not None else [])},
    }, schema=schema)


def dropped_table(ids: np.ndarray, reason: str, rnd: int | None = None, scores: np.ndarray | None = None) -> pa.Table:
    """Rows of ``dropped``: ids with one reason, the round and score (null for error rows)."""
    n = len(ids)
    return pa.table({"id": pa.array(ids.tolist(), pa.string()), "reason": pa.array([reason] * n, pa.string()),
                     "round": pa.array([rnd] * n, pa.int32()), "score": pa.array(scores, pa.float64(), from_pandas=True)
                     if scores is not None else pa.nulls(n, pa.float64())}, schema=DROPPED_SCHEMA)


def rows_to_drop(scores: np.ndarray, ids: np.ndarray, drop: float | None, drop_score: float | None,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """Positions dropped in one round: every score above ``drop_score``, or the worst ``drop`` fraction (of each
    label's rows, with ``labels``). Unscored rows (NaN: alone in their label) are never dropped."""
    if drop_score is not None:
        return np.flatnonzero(scores > drop_score)
    parts = [np.arange(len(scores))] if labels is None else [rows for _, rows in label_rows(label_names(labels))]
    out = []
    for rows in parts:
        rows = rows[~np.isnan(scores[rows])]
        n_drop = math.ceil((drop or 0.0) * len(rows))
        out.append(rows[np.lexsort((ids[rows].astype(str), -scores[rows]))[:n_drop]])
    return np.sort(np.concatenate([np.empty(0, np.int64), *out]))


def job_label_review(data, fit, own_scores: np.ndarray, k: int):
    """The label review of every row (``core.labels``) from the first round's whole-set neighbours and the
    per-label scores ``own_scores``; rows without a label neither vote nor get a review (their columns are null)."""
    from ..core.labels import review_labels

    names = label_names(data.extra["label"])
    known = np.array([v is not None for v in names], dtype=bool)
    pos = fit.neighbour_pos
    pos = np.where((pos >= 0) & known[np.maximum(pos, 0)], pos, -1).astype(np.int32)
    rev = review_labels(np.where(known, names, "").astype(str), pos, fit.neighbour_dist, own_scores, k)
    return LabelColumns(names, known, pos, rev.agreement, rev.score, rev.suggested, rev.suspect & known)


@dataclass
class LabelColumns:
    """The ranking's label columns, one entry per ok row (positions as in the collected data)."""

    label: np.ndarray  # (n,) object
    known: np.ndarray  # (n,) bool
    voter_pos: np.ndarray  # (n, c) the whole-set neighbours whose labels voted (-1: none, or unlabelled)
    agreement: np.ndarray  # (n,) float
    score: np.ndarray  # (n,) float: how strongly the evidence speaks against the label (core.labels)
    suggested: np.ndarray  # (n,) object
    suspect: np.ndarray  # (n,) bool


class RankJob(Job):
    kind = "rank"

    @property
    def find_duplicates(self) -> bool:
        """Duplicates come from the leave-one-out search, which a --reduce fit does not run."""
        return self.cfg.rank.duplicates and not self.cfg.index.reduce

    def outputs(self) -> list[str]:
        return (["ranking", "kept", "dropped"] + (["duplicates"] if self.find_duplicates else [])
                + ([] if self.cfg.model_dir else ["model"]) + ["report.html"])

    def report(self, run: Run, record: dict) -> None:
        from ..report.rank import rank_report

        run.staging.write_text("report.html", rank_report(
            record, run.staging.fs, run.staging.path("ranking"),
            run.staging.path("duplicates") if self.find_duplicates else None, self.cfg.normal))

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
        from ..stages.fit import fit_model, fit_per_label, shared_vector_warnings

        cfg, t, r = self.cfg, run.timings, self.cfg.rank
        labelled = bool(cfg.normal.label_column)
        with t.stage("embed data"):
            data = collect(embed_rows(self.data_src, cfg, run.weights_ref, hash_bytes=self.find_duplicates,
                                      fingerprints=self.find_duplicates))
        if len(data.X) < 2:
            raise ConfigError(f"ranking needs at least 2 readable images, the data has {len(data.X)}")
        prints = data.extra.pop("fingerprint", None)  # the first round's duplicate check only: rounds never copy it
        current, dropped, history, dups, review = data, [], [], None, None
        for rnd in range(1, r.rounds + 1):
            with t.stage(f"rank round {rnd}"):
                first = rnd == 1
                extra = EXTRA_NEIGHBOURS if (self.find_duplicates or labelled) and first else 0
                if first or not labelled:  # with labels only the first round's review needs the whole-set search
                    model, fit = fit_model(current, cfg, self.weights, extra_neighbours=extra)
                    if first:
                        run.fields["warnings"] = shared_vector_warnings(current.X, self.image_size())
                    scores, nbr_ids, nbr_dist = (fit.calibration_scores, fit.ids[fit.calibration_pos],
                                                 fit.calibration_dist)
                if labelled:  # each label's images against the rest of that label
                    scores, nbr_ids, nbr_dist = fit_per_label(current, current.extra["label"], cfg)
                gone = {}
                if first:
                    if labelled:
                        review = job_label_review(data, fit, scores, cfg.score.k)
                    run.staging.write_tables("ranking", ranking_schema(labelled), rank_tables(
                        current.ids, scores, nbr_ids, nbr_dist, data.errors, review))
                    if self.find_duplicates:
                        dups, prints = find_job_duplicates(data, fit, cfg, prints), None
                        run.staging.write_table("duplicates", duplicates_table(data.ids, dups))
                    if r.drop_duplicates and dups.n_groups:
                        gone["duplicate"] = dups.redundant
                    if r.drop_suspects:
                        taken = np.concatenate([np.empty(0, np.int64), *gone.values()])
                        gone["label"] = np.setdiff1d(np.flatnonzero(review.suspect), taken)
                    fit = nbr_ids = nbr_dist = None  # the first round's neighbour lists: written, not needed again
                n_first = sum(len(g) for g in gone.values())
                if n_first:
                    for reason, rows in gone.items():
                        dropped.append(dropped_table(data.ids[rows], reason, rnd, scores[rows]))
                    stay = np.setdiff1d(np.arange(len(scores)), np.concatenate(list(gone.values())))
                    if len(stay) < 2:
                        flags = " and ".join(f"--drop-{'duplicates' if g == 'duplicate' else 'suspects'}" for g in gone)
                        raise ConfigError(f"{flags} leave {len(stay)} image; a model needs at least 2")
                    current, scores = current.take(stay), scores[stay]
                labels = current.extra["label"] if labelled else None
                out = rows_to_drop(scores, current.ids, r.drop, r.drop_score, labels)
                history.append({"round": rnd, "rows": len(scores) + n_first, "dropped": int(len(out)) + n_first,
                                "threshold": model.threshold if not labelled else None})
                for reason, rows in gone.items():
                    if len(rows):
                        history[-1]["duplicates_dropped" if reason == "duplicate" else "suspects_dropped"] = len(rows)
                if len(out) == 0 or len(scores) - len(out) < 2:
                    history[-1]["dropped"] = n_first
                    break
                dropped.append(dropped_table(current.ids[out], "outlier", rnd, scores[out]))
                current = current.take(np.setdiff1d(np.arange(len(scores)), out))
        with t.stage("refit on kept rows"):
            model, _ = fit_model(current, cfg, self.weights)
            save_model(model, cfg.model_dir or run.staging.uri("model"), replace=cfg.overwrite)
        n_err = data.errors.num_rows
        dropped.append(dropped_table(np.asarray(data.errors["id"].to_pylist(), dtype=object), "error"))
        run.staging.write_table("kept", pa.table({"id": pa.array(current.ids.tolist(), pa.string())}))
        run.staging.write_table("dropped", pa.concat_tables(dropped))
        run.fields.update(
            k=model.k, threshold=model.threshold, rounds=history, rows={"ok": len(data.X), "error": n_err},
            kept=len(current.ids), dropped=sum(d.num_rows for d in dropped), model=vars(model.meta),
            model_dir=redact(cfg.model_dir) or output_path(cfg.out, "model"), duplicates=duplicates_record(dups, cfg),
            labels=labels_record(review, cfg, history[0].get("suspects_dropped", 0)),
            outputs={n: output_path(cfg.out, n) for n in self.outputs() if n != "model"})


def duplicates_record(dups, cfg) -> dict:
    """The run record's duplicate counts (or why there are none)."""
    from ..core.duplicates import EXTRA_NEIGHBOURS, FINGERPRINT_NEIGHBOURS
    from ..stages.fit import fit_params

    r = cfg.rank
    if not r.duplicates:
        return {"enabled": False}
    if dups is None:
        return {"enabled": False, "why": "--reduce replaces the leave-one-out search the groups come from"}
    images = bool(cfg.normal and not cfg.normal.embedding_column)
    return {"enabled": True, "ratio": r.duplicate_ratio, "similarity": r.duplicate_similarity,
            "verified_by": "fingerprints" if images else "ratio test only",
            "candidates": {"embedding_neighbours": fit_params(cfg).k + EXTRA_NEIGHBOURS,
                           "fingerprint_neighbours": FINGERPRINT_NEIGHBOURS if images else 0},
            "groups": dups.n_groups,
            "rows_in_groups": int(dups.size.sum()), "largest_group": int(dups.size.max(initial=0)),
            "dropped": len(dups.redundant) if r.drop_duplicates else 0}


def labels_record(review: LabelColumns | None, cfg, dropped: int) -> dict:
    """The run record's label-review counts (or that there was no label column)."""
    if review is None:
        return {"enabled": False}
    names = review.label[review.known]
    counts = {str(v): int(c) for v, c in zip(*np.unique(names.astype(str), return_counts=True))}
    return {"enabled": True, "column": cfg.normal.label_column, "labelled_rows": int(review.known.sum()),
            "unlabelled_rows": int((~review.known).sum()), "labels": len(counts),
            "alone_in_their_label": sorted(v for v, c in counts.items() if c == 1)[:20],
            "suspects": int(review.suspect.sum()),
            "dropped": int(dropped)}


def run_rank(cfg) -> dict:
    return RankJob(cfg).run()
