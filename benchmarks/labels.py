"""Finding images filed under the wrong label: the rank job's label review against cleanlab on the same embeddings.

    python benchmarks/labels.py --dataset cifar10 --backbone efficientnet_lite2

Takes N train images per class, flips 5 % and 10 % of the labels to another class at random, and ranks rows by
how likely their label is wrong, from the leave-one-out neighbours the rank job already searches (k=2 +
``EXTRA_NEIGHBOURS``): ``dnnad.core.labels.review_labels`` as the job runs it (distance-weighted votes plus
the margin against each label's own DN2 scores), and its votes alone. The peer is cleanlab: ``find_label_issues``
and its label quality scores, fed with the same neighbours' out-of-sample kNN class probabilities. Reports ROC
AUC of finding the flipped images, precision among the top-m (m = the flipped count), and each method's own
flagged set (precision, recall).
Needs cleanlab (a benchmark dependency only: ``pip install -e ".[bench]"``). Embeddings are cached.
"""
from __future__ import annotations

import argparse
import datetime as dt
import time

import numpy as np
from common import cached_embeddings, git_rev, machine, subsample, write_results
from sklearn.metrics import roc_auc_score

from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.duplicates import EXTRA_NEIGHBOURS
from dnnad.core.labels import review_labels

RATES = (0.05, 0.10)


def flip(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, bool mask of flipped rows): ``rate`` of the rows moved to a random other class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    flipped = np.zeros(len(labels), bool)
    flipped[rng.choice(len(labels), round(rate * len(labels)), replace=False)] = True
    noisy = labels.copy()
    for i in np.flatnonzero(flipped):
        noisy[i] = rng.choice(classes[classes != labels[i]])
    return noisy, flipped


def knn_probabilities(noisy: np.ndarray, pos: np.ndarray, n_classes: int) -> np.ndarray:
    """Out-of-sample class probabilities: each row's leave-one-out neighbours' label shares (smoothed)."""
    votes = np.zeros((len(noisy), n_classes))
    valid = pos >= 0
    np.add.at(votes, (np.repeat(np.arange(len(noisy)), pos.shape[1]), noisy[np.where(valid, pos, 0)].ravel()),
              valid.ravel().astype(float))
    votes += 1e-3
    return votes / votes.sum(axis=1, keepdims=True)


def precision_at(score: np.ndarray, truth: np.ndarray, m: int) -> float:
    return float(truth[np.argsort(-score, kind="stable")[:m]].mean())


def evaluate(X: np.ndarray, labels: np.ndarray, rate: float, seed: int) -> list[dict]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    noisy, flipped = flip(labels, rate, seed)
    m = int(flipped.sum())
    t0 = time.perf_counter()
    fit = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS))
    search = time.perf_counter() - t0
    rows = []
    t0 = time.perf_counter()
    own = np.full(len(X), np.nan)  # each label's images against the rest of that label: the job's per-label ranking
    for c in np.unique(noisy):
        rows_c = np.flatnonzero(noisy == c)
        own[rows_c] = fit_reference(X[rows_c], None, FitParams(k=2)).calibration_scores
    per_label = time.perf_counter() - t0
    for name, scores in (("votes + margin [job]", own), ("votes only", None)):
        t0 = time.perf_counter()
        r = review_labels(noisy, fit.neighbour_pos, fit.neighbour_dist, scores, 2)
        took = time.perf_counter() - t0 + (per_label if scores is not None else 0)
        rows.append({"method": f"dnnad review_labels ({name})",
                     "auc": roc_auc_score(flipped, r.score), "p_at_m": precision_at(r.score, flipped, m),
                     "flagged": int(r.suspect.sum()), "precision": float(flipped[r.suspect].mean()) if r.suspect.any() else 0,
                     "recall": float(r.suspect[flipped].mean()), "seconds": took})
    t0 = time.perf_counter()
    probs = knn_probabilities(noisy, fit.neighbour_pos, len(np.unique(labels)))
    quality = get_label_quality_scores(noisy, probs)
    issues = find_label_issues(noisy, probs)
    took = time.perf_counter() - t0
    rows.append({"method": "cleanlab find_label_issues (kNN probabilities)", "auc": roc_auc_score(flipped, -quality),
                 "p_at_m": precision_at(-quality, flipped, m), "flagged": int(issues.sum()),
                 "precision": float(flipped[issues].mean()) if issues.any() else 0, "recall": float(issues[flipped].mean()),
                 "seconds": took})
    for r in rows:
        r.update(rate=rate, flipped=m, search=search)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=("cifar10", "fashion-mnist"))
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=300, help="train images per class")
    ap.add_argument("--seeds", type=int, default=3, help="label flips drawn per rate")
    a = ap.parse_args()
    t = subsample(a.dataset, a.per_class, 0)
    t = t.filter(np.asarray(t["split"].to_pylist()) == "train")
    ids, labels = t["id"].to_pylist(), t["label"].to_numpy()
    X = cached_embeddings(a.dataset, ids, a.backbone, a.weights, a.image_size)
    rows = [r for rate in RATES for seed in range(a.seeds) for r in evaluate(X, labels, rate, seed)]
    size = f" --image-size {a.image_size}" if a.image_size else ""
    cmd = (f"python benchmarks/labels.py --dataset {a.dataset} --backbone {a.backbone}{size} --per-class {a.per_class} "
           f"--seeds {a.seeds}")
    lines = [f"# Label review, {a.dataset}: {a.backbone}{size} ({a.weights} weights)", "",
             f"- command: `{cmd}`", f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}",
             f"- {len(ids)} train images ({a.per_class} per class), labels flipped to a random other class; "
             f"neighbours: k=2 + {EXTRA_NEIGHBOURS} leave-one-out (search {rows[0]['search']:.1f} s); "
             f"mean over {a.seeds} flips", "",
             "| flipped | method | ROC AUC | precision at m | flagged | precision | recall | s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for rate in RATES:
        for mth in methods:
            rs = [r for r in rows if r["rate"] == rate and r["method"] == mth]
            mean = lambda k, rs=rs: float(np.mean([r[k] for r in rs]))  # noqa: E731
            lines.append(f"| {rate:.0%} (m={rs[0]['flipped']}) | {mth} | {mean('auc'):.4f} | {mean('p_at_m'):.3f} | "
                         f"{mean('flagged'):.0f} | {mean('precision'):.3f} | {mean('recall'):.3f} | {mean('seconds'):.2f} |")
    stem = f"labels-{a.dataset}-{a.backbone}{'-' + str(a.image_size) if a.image_size else ''}-{a.per_class}"
    write_results(stem, lines)


if __name__ == "__main__":
    main()
