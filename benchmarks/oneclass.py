"""The DN2 paper's one-class protocol and its companions, on real data, with baselines in the same run.

    python benchmarks/oneclass.py --dataset cifar10 --backbone efficientnet_lite2 --train-per-class 200 --test-n 2000

Prints and writes (benchmarks/results/) tables of: ROC AUC per class and mean for DN2, raw-pixel kNN and
scikit-learn NearestNeighbors on the same embeddings (which must agree with DN2: a correctness check);
the few-shot curve; the contamination curve with and without the cleaning stage; a k sweep and k-means
reduction. Embeddings are cached (benchmarks/.cache), so re-runs with other protocols do not re-embed.

``--dataset mtd`` (Magnetic-Tile defects) has one normal class, the defect-free train tiles: every test tile
is scored, anomalous = any defect, with the ROC AUC per defect kind beside the mean; the few-shot and
contamination figures average 10 draws, and the contaminants are defective test tiles, held out of the test set.

``--protocols variants`` compares the feature options side by side with plain DN2 in one run: resize
(crop | full) x read-out (final features | --layers, with or without --tta flip) x transform (none, l2,
whiten, l2+whiten) on the one-class protocol, then the few-shot and contamination protocols (with and
without cleaning) for plain DN2 and the main variants, and each option's embedding time and memory.
Pooled features of every layer are computed once per resize mode (``common.cached_taps``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import time
import warnings

import numpy as np
from common import cached_embeddings, cached_taps, git_rev, machine, raw_pixels, subsample, write_results
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from dnnad import DN2, rank_outliers


def auroc(normal: np.ndarray, test: np.ndarray, y_anom: np.ndarray, k: int, **kw) -> float:
    return float(roc_auc_score(y_anom, DN2(k=k, **kw).fit(normal).anomaly_score(test)))


def kind_aucs(y_test: np.ndarray, s: np.ndarray, c: int, kinds) -> list[float]:
    """ROC AUC of the normal test images (label c) against each anomaly kind alone (MTD: each defect kind)."""
    return [float(roc_auc_score(y_test[m] != c, s[m])) for m in ((y_test == c) | (y_test == k) for k in kinds)]


def contaminants(train: dict, test: np.ndarray, labels: np.ndarray, c: int, n_bad: int, rng):
    """n_bad anomalous images for class c's normal set, and the test rows to score: other classes' train
    images and the whole test set; with one normal class (MTD) anomalous test images, held out of the test set."""
    others = np.array([i for o in train if o != c for i in train[o]], dtype=int)
    if len(others):
        return rng.choice(others, size=n_bad, replace=False), test
    bad = rng.choice(test[labels[test] != c], size=n_bad, replace=False)
    return bad, np.setdiff1d(test, bad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist", "mtd"])
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--decode", default="exact", choices=["exact", "reduced"], help="the jobs' --decode")
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-n", type=int, default=2000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocols", default="oneclass,fewshot,contamination,ksweep,reduce",
                    help="any of oneclass,fewshot,contamination,ksweep,reduce,variants")
    ap.add_argument("--layers", default="blocks.4,blocks.5,blocks.6,final", help="--layers of the variants")
    ap.add_argument("--resize-modes", default="crop,full", help="preprocessing of the variants (full adds flip)")
    a = ap.parse_args()
    protocols = set(a.protocols.split(","))
    rng = np.random.default_rng(a.seed)

    t0 = time.perf_counter()
    rows = subsample(a.dataset, a.train_per_class, a.test_n, a.seed)
    ids, labels, split = rows["id"].to_pylist(), rows["label"].to_numpy(), rows["split"].to_numpy(zero_copy_only=False)
    plain = protocols - {"variants"}
    X = cached_embeddings(a.dataset, ids, a.backbone, a.weights, a.image_size, decode=a.decode) if plain else None
    t_embed = time.perf_counter() - t0
    names = dict(zip(labels.tolist(), rows["label_name"].to_pylist()))
    classes = np.unique(labels[split == "train"])  # the normal classes (MTD: MT_Free only)
    train = {c: np.flatnonzero((split == "train") & (labels == c)) for c in classes}
    n_train = min(len(v) for v in train.values())
    test = np.flatnonzero(split == "test")
    Xt, yt = (X[test] if X is not None else None), labels[test]
    kinds = np.setdiff1d(yt, classes) if len(classes) == 1 else []  # per-kind ROC AUC with one normal class
    draws = max(1, 10 // len(classes))  # few-shot and contamination draws per class: 10 with one normal class
    lines = [f"# One-class {a.dataset}: {a.backbone} ({a.weights} weights)", "",
             f"- command: `python benchmarks/oneclass.py --dataset {a.dataset} --backbone {a.backbone} "
             f"--weights {a.weights} --train-per-class {a.train_per_class} --test-n {a.test_n} --k {a.k}"
             + (f" --image-size {a.image_size}" if a.image_size else "")
             + (f" --decode {a.decode}" if a.decode != "exact" else "")
             + "".join(f" --{o.replace('_', '-')} {getattr(a, o)}" for o in ("protocols", "layers", "resize_modes")
                       if getattr(a, o) != ap.get_default(o)) + "`",
             f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}",
             f"- {n_train} train images per class (normal set), {len(test)} test images, seed {a.seed}; "
             f"embedding (or cache read) took {t_embed:.0f}s", ""]
    csv_rows = []

    if "oneclass" in protocols:
        P = raw_pixels(a.dataset, ids)
        lines += ["## One-class ROC AUC (anomalous = every other class)", "",
                  "| class | DN2 | raw-pixel kNN | sklearn NN on same embeddings | max score diff vs sklearn |"
                  + "".join(f" DN2: {names[c]} vs {names[k]} |" for c in classes for k in kinds),
                  "|---|---|---|---|---|" + "---|" * len(kinds)]
        res = []
        for c in classes:
            y = (yt != c).astype(int)
            model = DN2(k=a.k).fit(X[train[c]])
            s = model.anomaly_score(Xt)
            dist, _ = NearestNeighbors(n_neighbors=a.k).fit(X[train[c]]).kneighbors(Xt)
            s_sk = dist.mean(1)
            diff = float(np.max(np.abs(s - s_sk) / np.maximum(s_sk, 1e-12)))
            r = (roc_auc_score(y, s), auroc(P[train[c]], P[test], y, a.k), roc_auc_score(y, s_sk), diff)
            res.append(r)
            per_kind = kind_aucs(yt, s, c, kinds)
            lines.append(f"| {c} | {r[0]:.4f} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.1e} |"
                         + "".join(f" {v:.4f} |" for v in per_kind))
            csv_rows.append(["oneclass", int(c), a.k, r[0], r[1], r[2]])
            csv_rows += [["oneclass-kind", f"{c} / {names[k]}", a.k, v, "", ""] for k, v in zip(kinds, per_kind)]
            assert diff < 1e-4, f"DN2 and scikit-learn disagree on class {c}: {diff}"
        m = np.mean(res, axis=0)
        lines += [f"| **mean** | **{m[0]:.4f}** | {m[1]:.4f} | {m[2]:.4f} | {max(r[3] for r in res):.1e} |"
                  + " |" * len(kinds), ""]
        print(f"mean ROC AUC: DN2 {m[0]:.4f}  raw-pixel kNN {m[1]:.4f}  sklearn-NN {m[2]:.4f}")

    if "fewshot" in protocols:
        sizes = [n for n in (1, 2, 5, 10, 50, 100, 200, 500, 1000) if n <= n_train]
        lines += ["## Few-shot: mean ROC AUC over classes vs normal images per class", "",
                  f"Mean over classes and {draws} draw(s) per class.", "",
                  "| normal images | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
        curve = []
        for n in sizes:
            vals = []
            for c in (c for c in classes for _ in range(draws)):
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
        lines += [f"## Contamination: mean ROC AUC with a fraction p of {CONTAMINANTS[len(classes) > 1]} in the "
                  f"normal set ({draws} draw(s) per class)", "",
                  "Cleaning = rank the normal set against itself (leave-one-out kNN), drop the top p, refit.", "",
                  "| p | " + " | ".join(f"{p:.1%}" for p in fracs) + " |", "|---|" + "---|" * len(fracs)]
        plain, cleaned, rank_auc, rank_prec = [], [], [], []
        for p in fracs:
            v_plain, v_clean, v_rauc, v_prec = [], [], [], []
            for c in (c for c in classes for _ in range(draws)):
                n_bad = int(round(p * len(train[c]) / (1 - p))) if p else 0
                bad, tst = contaminants(train, test, labels, c, n_bad, rng)
                normal = np.vstack([X[train[c]], X[bad]])
                y = (labels[tst] != c).astype(int)
                v_plain.append(auroc(normal, X[tst], y, a.k))
                if p:
                    loo = rank_outliers(normal, k=a.k)
                    injected = np.r_[np.zeros(len(train[c])), np.ones(n_bad)]
                    v_rauc.append(roc_auc_score(injected, loo))
                    v_prec.append(injected[np.argsort(-loo, kind="stable")[:n_bad]].mean())
                    keep = np.argsort(loo, kind="stable")[: len(normal) - math.ceil(p * len(normal))]
                    v_clean.append(auroc(normal[keep], X[tst], y, a.k))
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
        ks = [k for k in (1, 2, 5, 10, 50) if k < n_train]
        lines += ["## k sweep and k-means reduction: mean ROC AUC", "", "| setting | mean ROC AUC |", "|---|---|"]
        for k in ks if "ksweep" in protocols else []:
            v = np.mean([auroc(X[train[c]], Xt, (yt != c).astype(int), k) for c in classes])
            lines.append(f"| k={k} | {v:.4f} |")
            csv_rows.append(["ksweep", k, k, v, "", ""])
        for frac in (0.01, 0.10) if "reduce" in protocols else []:
            n_c = max(2, int(frac * n_train))
            v = np.mean([auroc(X[train[c]], Xt, (yt != c).astype(int), 1 if n_c <= 2 else a.k, reduce=n_c)
                         for c in classes])
            lines.append(f"| k-means to {frac:.0%} ({n_c} centroids) | {v:.4f} |")
            csv_rows.append(["reduce", frac, a.k, v, "", ""])
        lines.append("")

    if "variants" in protocols:
        lines += variants(a, ids, train, test, labels, names, kinds, csv_rows)

    modes = "" if a.resize_modes == ap.get_default("resize_modes") else "-" + a.resize_modes.replace(",", "+")
    stem = f"oneclass-{a.dataset}-{a.backbone}-{a.train_per_class}x{a.test_n}" + ("" if plain else "-variants" + modes)
    out = write_results(stem, lines)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([["protocol", "param", "k", "dn2", "baseline_or_cleaned", "sklearn"], *csv_rows])
    print(f"wrote {out / stem}.md and .csv")


CONTAMINANTS = {True: "other-class train images", False: "anomalous test images (held out of the test set)"}
TRANSFORMS = {"none": {}, "l2": {"normalize": "l2"}, "whiten": {"whiten": True},
              "l2+whiten": {"normalize": "l2", "whiten": True}}


def contaminated_aucs(X, train, test, labels, p, rng, k, opts, draws=1) -> tuple[float, float, float]:
    """Mean ROC AUC over classes (and ``draws`` draws each) with a fraction p of anomalous images in the normal
    set (``contaminants``): as is; cleaned (rank with the transform fitted on the contaminated set, drop the top
    p, refit everything on the kept rows); cleaned but keeping the transform fitted on the contaminated set
    (whitening only)."""
    from dnnad.core.features import fit_transform

    plain, clean, clean_keep = [], [], []
    for c in (c for c in train for _ in range(draws)):
        n_bad = int(round(p * len(train[c]) / (1 - p)))
        bad, tst = contaminants(train, test, labels, c, n_bad, rng)
        normal = np.vstack([X[train[c]], X[bad]])
        y = (labels[tst] != c).astype(int)
        plain.append(auroc(normal, X[tst], y, k, **opts))
        keep = np.argsort(rank_outliers(normal, k=k, **opts), kind="stable")[: len(normal) - math.ceil(p * len(normal))]
        clean.append(auroc(normal[keep], X[tst], y, k, **opts))
        if opts.get("whiten"):
            t = fit_transform(normal, **opts)
            clean_keep.append(auroc(t.transform(normal[keep]), t.transform(X[tst]), y, k))
    return float(np.mean(plain)), float(np.mean(clean)), float(np.mean(clean_keep)) if clean_keep else float("nan")


def embedding_costs(a, layers: tuple[str, ...], ids: list[str]) -> list[str]:
    """Seconds per image of each read-out (same forward code as the jobs) and the embedding size."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch
    from common import DATASETS

    from dnnad.vision.backbones import FeatureExtractor, preprocess_fn
    from dnnad.vision.decode import decode_image
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    t = pq.read_table(DATASETS[a.dataset], columns=["id", "image"])
    t = t.filter(pc.is_in(t["id"], value_set=pa.array(ids[:32])))
    out = ["| read-out | s per image (CPU, batch of 32, forward only) | embedding dim | index bytes per image | "
           "whitener (float64) |", "|---|---|---|---|---|"]
    base = None
    for name, lay, tta in (("final (plain DN2)", (), None), ("--layers", layers, None),
                           ("--tta flip", (), "flip"), ("--layers + --tta flip", layers, "flip")):
        spec = get_spec(a.backbone, a.image_size, lay, tta, "full")
        fe = FeatureExtractor(spec, resolve_weights(spec, a.weights).state_dict, device="cpu",
                              threads=os.cpu_count())
        x = torch.stack([preprocess_fn(spec)(decode_image(b)) for b in t["image"].to_pylist()])
        fe(x[:8])  # warm-up
        secs = []
        for _ in range(2):  # best of two: the machine is shared
            t0 = time.perf_counter()
            d = fe(x).shape[1]
            secs.append((time.perf_counter() - t0) / len(x))
        sec = min(secs)
        base = base or sec
        out.append(f"| {name} | {sec:.3f} ({sec / base:.2f}x) | {d} | {4 * d:,} | {8 * d * d / 2**20:.0f} MiB |")
    return out


def variants(a, ids, train, test, labels, names, kinds, csv_rows) -> list[str]:
    """Every feature option side by side with plain DN2 (see the module docstring). Every few-shot and
    contamination row draws the same images (a fresh seed-``a.seed`` generator per row), so rows are paired."""
    from dnnad.vision.backbones import embed_from_taps

    layers = tuple(a.layers.split(","))
    yt = labels[test]
    t0 = time.perf_counter()
    taps = {r: cached_taps(a.dataset, ids, a.backbone, a.weights, a.image_size, r, r == "full")
            for r in a.resize_modes.split(",")}  # flip views with the full resize only: one more forward pass
    print(f"pooled features (or cache read) took {time.perf_counter() - t0:.0f}s", flush=True)
    readouts = {}  # name -> embeddings
    for resize, views in taps.items():
        for lay, lname in (((), "final"), (layers, "layers")):
            for flip in (False, True)[: len(views)]:
                readouts[f"{resize}, {lname}{', flip' if flip else ''}"] = embed_from_taps(views[: 1 + flip], lay)

    def one_class(X, opts) -> tuple[float, list[float]]:
        """Mean ROC AUC over classes, and per anomaly kind (one normal class only)."""
        s = {c: DN2(k=a.k, **opts).fit(X[train[c]]).anomaly_score(X[test]) for c in train}
        return (float(np.mean([roc_auc_score(yt != c, s[c]) for c in train])),
                [v for c in train for v in kind_aucs(yt, s[c], c, kinds)])

    lines = [f"## Feature options: one-class mean ROC AUC (same normal and test images, k = {a.k})", "",
             "Rows: preprocessing (crop = resize + centre crop, as shipped; full = `--resize full`) and read-out "
             f"(final = pooled penultimate features, as shipped; layers = `--layers {a.layers}`; flip = "
             "`--tta flip`). Columns: `--normalize` / `--whiten`. Plain DN2 as shipped is *crop, final, none*.", "",
             "| read-out | " + " | ".join(TRANSFORMS) + " |", "|---|" + "---|" * len(TRANSFORMS)]
    grid, by_kind = {}, []
    for name, X in readouts.items():
        row, per_kind = zip(*(one_class(X, opts) for opts in TRANSFORMS.values()))
        grid.update({(name, t): v for t, v in zip(TRANSFORMS, row)})
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        csv_rows += [["variant", f"{name} / {t}", a.k, v, "", ""] for t, v in zip(TRANSFORMS, row)]
        csv_rows += [["variant-kind", f"{name} / {t} / {names[k]}", a.k, v, "", ""]
                     for t, vs in zip(TRANSFORMS, per_kind) for k, v in zip(kinds, vs)]
        by_kind.append(f"| {name} | " + " | ".join(f"{v:.4f}" for vs in per_kind for v in vs) + " |")
        print(name, np.round(row, 4), np.round(per_kind, 4), flush=True)
    if len(kinds):
        lines += ["", f"Per anomaly kind: ROC AUC of the normal test images ({names[next(iter(train))]}) against "
                  "each kind alone.", "",
                  "| read-out | " + " | ".join(f"{t}: {names[k]}" for t in TRANSFORMS for k in kinds) + " |",
                  "|---|" + "---|" * (len(TRANSFORMS) * len(kinds)), *by_kind]
    best = max(grid, key=grid.get)
    plain_name = "crop, final" if "crop" in taps else "full, final"
    lines += ["", f"Best: **{best[0]} / {best[1]}: {grid[best]:.4f}** against plain DN2 ({plain_name}, none) "
              f"{grid[(plain_name, 'none')]:.4f}.", ""]
    chosen = {"DN2 as shipped (crop, final)": ("crop, final", "none"), "--normalize l2 (crop)": ("crop, final", "l2"),
              "--resize full": ("full, final", "none"), "--resize full --normalize l2": ("full, final", "l2"),
              "--resize full --normalize l2 --whiten": ("full, final", "l2+whiten"),
              "--normalize l2 --whiten (crop)": ("crop, final", "l2+whiten"),
              "--resize full --layers --tta flip --normalize l2 --whiten": ("full, layers, flip", "l2+whiten"),
              "best of the grid": best}
    chosen = {k: v for k, v in chosen.items() if v[0] in readouts}
    sizes = [n for n in (1, 2, 5, 10, 50, 100, 200, 500) if n <= min(len(v) for v in train.values())]
    fracs, draws = (0.05, 0.10), max(1, 10 // len(train))  # one normal class (MTD): mean of 10 draws
    lines += ["## Feature options in the few-shot and contaminated settings: mean ROC AUC", "",
              f"Every row draws the same images; mean over classes and {draws} draw(s) per class. Contamination: a "
              f"fraction p of {CONTAMINANTS[len(train) > 1]} in the normal set. *cleaned* = rank the normal set "
              "against itself with the same options (transform fitted on the contaminated set), drop the top p, "
              "refit (transform refitted on the kept rows); *kept transform* = cleaned, but keeping the transform "
              "fitted on the contaminated set.", "",
              "| variant | " + " | ".join(f"{n}-shot" for n in sizes) + " | "
              + " | ".join(f"p={p:.0%} | p={p:.0%} cleaned | p={p:.0%} kept transform" for p in fracs) + " |",
              "|---|" + "---|" * (len(sizes) + 3 * len(fracs))]
    for label, (name, tname) in chosen.items():
        X, opts, rng = readouts[name], TRANSFORMS[tname], np.random.default_rng(a.seed)
        shots = []
        for n in sizes:
            vals = []
            for c in (c for c in train for _ in range(draws)):
                pick = rng.choice(train[c], size=n, replace=False)
                normal = X[pick] if n > 1 else np.vstack([X[pick], X[pick]])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vals.append(auroc(normal, X[test], (yt != c).astype(int), a.k, **opts))
            shots.append(float(np.mean(vals)))
        cont = [v for p in fracs for v in contaminated_aucs(X, train, test, labels, p, rng, a.k, opts, draws)]
        lines.append(f"| {label} ({name} / {tname}) | " + " | ".join(f"{v:.4f}" for v in shots) + " | "
                     + " | ".join("–" if np.isnan(v) else f"{v:.4f}" for v in cont) + " |")
        csv_rows += [["variant-fewshot", f"{label} / {n}", a.k, v, "", ""] for n, v in zip(sizes, shots)]
        csv_rows += [["variant-contamination", f"{label} / {p}", a.k, *cont[3 * i:3 * i + 2], ""]
                     for i, p in enumerate(fracs)]
        print(lines[-1], flush=True)
    lines += ["", "## Cost of each option", ""]
    lines += embedding_costs(a, layers, ids)
    lines += ["", "`--normalize l2` and `--whiten` cost no forward pass: the transform is fitted once on the normal "
              "set (a thin SVD) and applied to every query batch (one d x d product); the whitener is stored in "
              "the model as float64.", ""]
    return lines


if __name__ == "__main__":
    main()
