"""The DN2 paper's one-class protocol and its companions, on real data, with baselines in the same run.

    python benchmarks/oneclass.py --dataset cifar10 --backbone efficientnet_lite2 --train-per-class 200 --test-n 2000

Prints and writes (benchmarks/results/) tables of: ROC AUC per class and mean for DN2, raw-pixel kNN and
scikit-learn NearestNeighbors on the same embeddings (which must agree with DN2: a correctness check);
the few-shot curve; the contamination curve with and without the cleaning stage; a k sweep and k-means
reduction. Embeddings are cached (benchmarks/.cache), so re-runs with other protocols do not re-embed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import time
import warnings

import numpy as np
from common import ROOT, cached_embeddings, git_rev, machine, raw_pixels, subsample
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from dnnad import DN2, rank_outliers


def auroc(normal: np.ndarray, test: np.ndarray, y_anom: np.ndarray, k: int, **kw) -> float:
    return float(roc_auc_score(y_anom, DN2(k=k, **kw).fit(normal).score_samples(test)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist"])
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-n", type=int, default=2000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocols", default="oneclass,fewshot,contamination,ksweep,reduce")
    a = ap.parse_args()
    protocols = set(a.protocols.split(","))
    rng = np.random.default_rng(a.seed)

    t0 = time.perf_counter()
    rows = subsample(a.dataset, a.train_per_class, a.test_n, a.seed)
    ids, labels, split = rows["id"].to_pylist(), rows["label"].to_numpy(), rows["split"].to_numpy(zero_copy_only=False)
    X = cached_embeddings(a.dataset, ids, a.backbone, a.weights, a.image_size)
    t_embed = time.perf_counter() - t0
    classes = np.unique(labels)
    train = {c: np.flatnonzero((split == "train") & (labels == c)) for c in classes}
    test = np.flatnonzero(split == "test")
    Xt, yt = X[test], labels[test]
    lines = [f"# One-class {a.dataset}: {a.backbone} ({a.weights} weights)", "",
             f"- command: `python benchmarks/oneclass.py --dataset {a.dataset} --backbone {a.backbone} "
             f"--weights {a.weights} --train-per-class {a.train_per_class} --test-n {a.test_n} --k {a.k}"
             + (f" --image-size {a.image_size}" if a.image_size else "") + "`",
             f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}",
             f"- {a.train_per_class} train images per class (normal set), {len(test)} test images, seed {a.seed}; "
             f"embedding (or cache read) took {t_embed:.0f}s", ""]
    csv_rows = []

    if "oneclass" in protocols:
        P = raw_pixels(a.dataset, ids)
        lines += ["## One-class ROC AUC (anomalous = every other class)", "",
                  "| class | DN2 | raw-pixel kNN | sklearn NN on same embeddings | max score diff vs sklearn |",
                  "|---|---|---|---|---|"]
        res = []
        for c in classes:
            y = (yt != c).astype(int)
            model = DN2(k=a.k).fit(X[train[c]])
            s = model.score_samples(Xt)
            dist, _ = NearestNeighbors(n_neighbors=a.k).fit(X[train[c]]).kneighbors(Xt)
            s_sk = dist.mean(1)
            diff = float(np.max(np.abs(s - s_sk) / np.maximum(s_sk, 1e-12)))
            r = (roc_auc_score(y, s), auroc(P[train[c]], P[test], y, a.k), roc_auc_score(y, s_sk), diff)
            res.append(r)
            lines.append(f"| {c} | {r[0]:.4f} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.1e} |")
            csv_rows.append(["oneclass", int(c), a.k, r[0], r[1], r[2]])
            assert diff < 1e-4, f"DN2 and scikit-learn disagree on class {c}: {diff}"
        m = np.mean(res, axis=0)
        lines += [f"| **mean** | **{m[0]:.4f}** | {m[1]:.4f} | {m[2]:.4f} | {max(r[3] for r in res):.1e} |", ""]
        print(f"mean ROC AUC: DN2 {m[0]:.4f}  raw-pixel kNN {m[1]:.4f}  sklearn-NN {m[2]:.4f}")

    if "fewshot" in protocols:
        sizes = [n for n in (1, 2, 5, 10, 50, 100, 200, 500, 1000) if n <= a.train_per_class]
        lines += ["## Few-shot: mean ROC AUC over classes vs normal images per class", "",
                  "| normal images | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
        curve = []
        for n in sizes:
            vals = []
            for c in classes:
                pick = rng.choice(train[c], size=n, replace=False)
                normal = X[pick] if n > 1 else np.vstack([X[pick], X[pick]])  # one image: k=1 on a duplicate
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # k is clamped on tiny normal sets, by design
                    vals.append(auroc(normal, Xt, (yt != c).astype(int), a.k))
            curve.append(np.mean(vals))
            csv_rows.append(["fewshot", n, a.k, curve[-1], "", ""])
        lines += ["| mean ROC AUC | " + " | ".join(f"{v:.4f}" for v in curve) + " |", ""]
        print("few-shot:", dict(zip(sizes, np.round(curve, 4))))

    if "contamination" in protocols:
        fracs = [0.0, 0.025, 0.05, 0.10, 0.20]
        lines += ["## Contamination: mean ROC AUC with a fraction p of other-class images in the normal set", "",
                  "Cleaning = rank the normal set against itself (leave-one-out kNN), drop the top p, refit.", "",
                  "| p | " + " | ".join(f"{p:.1%}" for p in fracs) + " |", "|---|" + "---|" * len(fracs)]
        plain, cleaned, rank_auc, rank_prec = [], [], [], []
        for p in fracs:
            v_plain, v_clean, v_rauc, v_prec = [], [], [], []
            for c in classes:
                n_bad = int(round(p * len(train[c]) / (1 - p))) if p else 0
                others = np.concatenate([train[o] for o in classes if o != c])
                normal = np.vstack([X[train[c]], X[rng.choice(others, size=n_bad, replace=False)]])
                y = (yt != c).astype(int)
                v_plain.append(auroc(normal, Xt, y, a.k))
                if p:
                    loo = rank_outliers(normal, k=a.k)
                    injected = np.r_[np.zeros(len(train[c])), np.ones(n_bad)]
                    v_rauc.append(roc_auc_score(injected, loo))
                    v_prec.append(injected[np.argsort(-loo, kind="stable")[:n_bad]].mean())
                    keep = np.argsort(loo, kind="stable")[: len(normal) - math.ceil(p * len(normal))]
                    v_clean.append(auroc(normal[keep], Xt, y, a.k))
                else:
                    v_clean.append(v_plain[-1])
            plain.append(np.mean(v_plain)), cleaned.append(np.mean(v_clean))
            rank_auc.append(np.mean(v_rauc) if v_rauc else float("nan"))
            rank_prec.append(np.mean(v_prec) if v_prec else float("nan"))
            csv_rows.append(["contamination", p, a.k, plain[-1], cleaned[-1], ""])
        lines += ["| DN2 | " + " | ".join(f"{v:.4f}" for v in plain) + " |",
                  "| DN2 + cleaning | " + " | ".join(f"{v:.4f}" for v in cleaned) + " |",
                  "| ranking: ROC AUC of injected images | " + " | ".join(f"{v:.4f}" for v in rank_auc) + " |",
                  "| ranking: precision at the injected count | " + " | ".join(f"{v:.4f}" for v in rank_prec) + " |",
                  ""]
        print("contamination plain:", np.round(plain, 4), "cleaned:", np.round(cleaned, 4))

    if "ksweep" in protocols or "reduce" in protocols:
        ks = [k for k in (1, 2, 5, 10, 50) if k < a.train_per_class]
        lines += ["## k sweep and k-means reduction: mean ROC AUC", "", "| setting | mean ROC AUC |", "|---|---|"]
        for k in ks if "ksweep" in protocols else []:
            v = np.mean([auroc(X[train[c]], Xt, (yt != c).astype(int), k) for c in classes])
            lines.append(f"| k={k} | {v:.4f} |")
            csv_rows.append(["ksweep", k, k, v, "", ""])
        for frac in (0.01, 0.10) if "reduce" in protocols else []:
            n_c = max(2, int(frac * a.train_per_class))
            v = np.mean([auroc(X[train[c]], Xt, (yt != c).astype(int), 1 if n_c <= 2 else a.k, reduce=n_c)
                         for c in classes])
            lines.append(f"| k-means to {frac:.0%} ({n_c} centroids) | {v:.4f} |")
            csv_rows.append(["reduce", frac, a.k, v, "", ""])
        lines.append("")

    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stem = f"oneclass-{a.dataset}-{a.backbone}-{a.train_per_class}x{a.test_n}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([["protocol", "param", "k", "dn2", "baseline_or_cleaned", "sklearn"], *csv_rows])
    print("\n".join(lines))
    print(f"wrote {out / stem}.md and .csv")


if __name__ == "__main__":
    main()
