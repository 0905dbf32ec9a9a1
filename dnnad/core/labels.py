"""Images filed under the wrong label, from the neighbours a kNN search over the whole set found.

Two pieces of evidence, each in [0, 1], are added into ``score`` (higher: the label is more likely wrong):
- the **vote**: each leave-one-out neighbour votes for its label, nearer ones louder (weight ``exp(-d / tau)``,
  ``tau`` the set's median neighbour distance, so one setting holds across backbones); ``agreement`` is the
  weighted share of votes for the row's own label, and ``1 - agreement`` the first term;
- the **margin**: ``own / (own + other)``, with ``own`` the row's DN2 score among the images of its own label
  (the per-label ranking) and ``other`` its mean distance to the k nearest images of the closest other
  label, read from the same neighbour list (a label with fewer than k there is padded with the list's last
  distance). Above 0.5 another label's images are nearer than the row's own.
A row is a ``suspect`` when another label out-votes its own *and* the margin agrees; that label is
``suggested``. Ray-free and vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REVIEW_ROWS = 65_536  # rows reviewed at a time


@dataclass(frozen=True)
class LabelReview:
    """Per row: ``agreement`` (weighted share of neighbour votes for its own label, in [0, 1]), ``margin`` (in
    [0, 1]; NaN without own-label scores), ``score`` (``1 - agreement`` plus the margin where known),
    ``suggested`` (the label that out-votes its own where the margin agrees, else None)."""

    agreement: np.ndarray  # (n,) float64
    margin: np.ndarray  # (n,) float64
    score: np.ndarray  # (n,) float64
    suggested: np.ndarray  # (n,) object

    @property
    def suspect(self) -> np.ndarray:
        """(n,) bool: another label out-votes the row's own, and its images are nearer."""
        return np.array([s is not None for s in self.suggested], dtype=bool)


def label_names(labels: np.ndarray) -> np.ndarray:
    """Labels as strings (None stays None): ``1`` and ``"1"`` are one label, in the review, the per-label
    ranking, the report and run.json alike."""
    return np.array([None if v is None else str(v) for v in labels], dtype=object)


def vote_weights(dist: np.ndarray, valid: np.ndarray, weighting: str = "distance") -> np.ndarray:
    """(n, c) weight of each neighbour's vote: ``exp(-d / tau)`` (``tau``: median valid distance) or 1."""
    if weighting == "uniform":
        return valid.astype(np.float64)
    d = np.asarray(dist, dtype=np.float64)
    tau = float(np.median(d[valid])) if valid.any() else 1.0
    return np.where(valid, np.exp(-d / max(tau, 1e-12)), 0.0)


def tally_votes(code: np.ndarray, neighbour_code: np.ndarray, w: np.ndarray,
                valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row (n,): total vote weight, the weight for its own label ``code``, the label with the most weight
    (the lowest code among ties; its own where nobody voted) and that weight. Sums each row's at most c
    (row, label) pairs: memory O(n c), never the (n, labels) table, which a set of 10^6 rows and 1,000
    labels would make 8 GB."""
    n, c = neighbour_code.shape
    keep = valid.ravel()
    rows, labs, ws = np.repeat(np.arange(n), c)[keep], neighbour_code.ravel()[keep], w.ravel()[keep]
    total = np.bincount(rows, weights=ws, minlength=n)
    own, best, best_w = np.zeros(n), code.copy(), np.zeros(n)
    if len(rows) == 0:
        return total, own, best, best_w
    order = np.lexsort((labs, rows))
    rows, labs, ws = rows[order], labs[order], ws[order]
    start = np.r_[True, (rows[1:] != rows[:-1]) | (labs[1:] != labs[:-1])]
    sums = np.bincount(np.cumsum(start) - 1, weights=ws)
    g_rows, g_labs = rows[start], labs[start]
    mine = g_labs == code[g_rows]
    own[g_rows[mine]] = sums[mine]
    top = np.lexsort((g_labs, -sums, g_rows))  # each row's heaviest label first, the lowest code among ties
    first = top[np.r_[True, g_rows[top][1:] != g_rows[top][:-1]]]
    best[g_rows[first]], best_w[g_rows[first]] = g_labs[first], sums[first]
    return total, own, best, best_w


def label_rows(names: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(label, its row positions ascending) for each label of ``names`` (None: unlabelled, left out), labels
    in sorted order: one sort, where comparing every row with every label would cost rows x labels."""
    known = np.flatnonzero(np.array([v is not None for v in names], dtype=bool))
    if len(known) == 0:
        return []
    # compared as Python strings: a fixed-width numpy string would drop trailing NULs and merge labels
    values, code = np.unique(np.array([str(v) for v in names[known]], dtype=object), return_inverse=True)
    order = np.argsort(code.ravel(), kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(code.ravel(), minlength=len(values)))]
    return [(str(v), known[order[a:b]]) for v, a, b in zip(values, bounds[:-1], bounds[1:])]


def nearest_other_label(code: np.ndarray, neighbour_code: np.ndarray, dist: np.ndarray, valid: np.ndarray,
                        k: int) -> np.ndarray:
    """(n,) mean distance to the k nearest neighbours of the closest label other than the row's own, from a
    neighbour list sorted nearest first; labels with fewer than k entries are padded with the row's last
    valid distance (rows with no other label listed get that distance)."""
    n, c = dist.shape
    last = np.where(valid, dist, -np.inf).max(axis=1)
    last = np.where(np.isfinite(last), last, np.inf)
    other = valid & (neighbour_code != code[:, None])
    rows, cols = np.nonzero(other)
    if len(rows) == 0:
        return last
    labs = neighbour_code[rows, cols]
    order = np.lexsort((cols, labs, rows))  # by row, then label, then nearness
    rows, labs, d = rows[order], labs[order], dist[rows[order], cols[order]]
    start = np.r_[True, (rows[1:] != rows[:-1]) | (labs[1:] != labs[:-1])]
    group = np.cumsum(start) - 1
    rank = np.arange(len(rows)) - np.flatnonzero(start)[group]
    take = rank < k
    sums = np.bincount(group[take], weights=d[take])
    counts = np.bincount(group[take])
    g_rows = rows[start]
    means = (sums + (k - counts) * last[g_rows]) / k
    out = last.copy()
    np.minimum.at(out, g_rows, means)
    return out


def review_labels(labels: np.ndarray, neighbour_pos: np.ndarray, neighbour_dist: np.ndarray,
                  own_scores: np.ndarray | None = None, k: int = 2, weighting: str = "distance") -> LabelReview:
    """Review ``labels`` (n,) against the labels of each row's neighbours ``neighbour_pos`` (n, c), positions
    into the same rows, nearest first, -1 for none, with distances ``neighbour_dist`` (n, c). ``own_scores``
    (n,): each row's DN2 score (mean distance to its k nearest) among its own label's images, NaN where it has
    none; without them the vote alone decides."""
    labels = np.asarray(labels)
    names, code = np.unique(labels.astype(str), return_inverse=True)
    code, n = code.ravel(), len(labels)
    valid = neighbour_pos >= 0
    w = vote_weights(neighbour_dist, valid, weighting)
    agreement, margin, out_voted, best = np.ones(n), np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, np.int64)
    for a in range(0, n, REVIEW_ROWS):  # rows apart: each chunk's temporaries, not the whole set's
        rows = slice(a, a + REVIEW_ROWS)
        ncode = code[np.where(valid[rows], neighbour_pos[rows], 0)]
        total, own_votes, best[rows], best_votes = tally_votes(code[rows], ncode, w[rows], valid[rows])
        agreement[rows] = np.divide(own_votes, total, out=np.ones(len(total)), where=total > 0)
        out_voted[rows] = best_votes > own_votes
        if own_scores is not None:
            own = np.asarray(own_scores[rows], dtype=np.float64)
            other = nearest_other_label(code[rows], ncode, np.asarray(neighbour_dist[rows], np.float64), valid[rows], k)
            with np.errstate(invalid="ignore", divide="ignore"):
                m = np.where(np.isnan(own), 1.0, own / (own + other))  # alone in its label: nothing nearer
            margin[rows] = np.nan_to_num(m, nan=0.5)  # 0 / 0: identical copies on both sides
    if own_scores is not None:
        out_voted &= margin > 0.5
    score = 1.0 - agreement + np.nan_to_num(margin, nan=0.0)
    suggested = np.where(out_voted, names[best].astype(object), None)
    return LabelReview(agreement, margin, score, suggested)
