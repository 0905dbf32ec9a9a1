"""Localisation on Magnetic-Tile defects: patch-level DN2 (``core.localize.PatchDN2``) against global DN2.

Normal set: MTD ``split=train`` (600 defect-free tiles); test: ``split=test`` (150 free, 115 blowholes, 57
cracks) with pixel masks. Images go to the network whole (``--resize full``). Reports, per setting, image
ROC AUC, pixel ROC AUC and AUPRO (per-region overlap integrated to FPR 0.3, normalised, as anomalib does),
overall and per defect kind; bank size, coreset / build / leave-one-image-out (threshold) time and query
time per image. SPADE (each test image against the patches of its K nearest normal images by the global
feature) is measured beside the full bank. Each setting has two rows on the same maps: the image score as the
raw maximum of the smoothed map, and the product's border-calibrated maximum (``core.patches.score_map``; its
statistics from the normal tiles' leave-one-image-out maps). Pixel metrics are of the raw maps.

    .venv/bin/python benchmarks/localise.py --backbone efficientnet_lite2 --coreset 0.01 0.1
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import CACHE, DATASETS, ROOT, git_rev, machine, write_results
from PIL import Image
from scipy.ndimage import label as components
from sklearn.metrics import roc_auc_score

from dnnad.core.arrays import l2_normalize
from dnnad.core.localize import PatchDN2, map_scores
from dnnad.core.patches import SIGMA, border_calibration, map_to_image
from dnnad.core.settings import COMPRESSED_KINDS, INDEX_KINDS
from dnnad.vision.decode import decode_image

FPR_LIMIT = 0.3


def features(backbone: str, size: int | None, stages: tuple[str, ...] = (), batch: int = 8) -> dict:
    """Global embeddings and patch grids of every MTD tile (cached in benchmarks/.cache); ``stages``
    replaces the backbone's patch stages (``vision.specs.PATCH_STAGES``) to compare others."""
    import dataclasses

    from dnnad.vision.specs import get_spec

    spec = get_spec(backbone, size, resize="full", localize=True)
    spec = dataclasses.replace(spec, patches=tuple(stages)) if stages else spec
    path = CACHE / f"localise-mtd-{backbone}-{spec.image_size}-{'+'.join(spec.patches)}-l2.npz"
    t = pq.read_table(DATASETS["mtd"])
    if path.exists():
        z = np.load(path)
        return {"emb": z["emb"], "patches": z["patches"].astype(np.float32), "embed_s": float(z["embed_s"]),
                "table": t, "size": spec.image_size}
    t0 = time.perf_counter()
    emb, patches = embed_images(spec, t["image"].to_pylist(), batch)
    embed_s = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=emb, patches=patches, embed_s=embed_s)
    return {"emb": emb, "patches": patches.astype(np.float32), "embed_s": embed_s, "table": t, "size": spec.image_size}


def embed_images(spec, images: list[bytes], batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Global embeddings (n, D) and float16 patch grids (n, h, w, d) of encoded images, as the jobs embed them
    (ONNX Runtime, the offline ImageNet weights)."""
    from dnnad.vision.backbones import FeatureExtractor
    from dnnad.vision.preprocess import crop_fn, normalize_batch
    from dnnad.vision.runtimes import cached_export
    from dnnad.vision.weights import resolve_weights

    w = resolve_weights(spec, "imagenet")
    fe = FeatureExtractor(spec, None, device="cpu", threads=os.cpu_count(), onnx_model=cached_export(spec, w.state_dict))
    crop = crop_fn(spec)
    embs, grids = [], []
    for s in range(0, len(images), batch):
        e, p = fe.with_patches(normalize_batch(spec, np.stack([crop(decode_image(b)) for b in images[s:s + batch]])))
        embs.append(e)
        grids.append(p.astype(np.float16))
    return np.concatenate(embs), np.concatenate(grids)


def oneclass(dataset: str, backbone: str, size: int, classes: list[int], n_train: int, n_test: int,
             coreset: float) -> None:
    """--localize as a one-class detector on small square images (CIFAR-10, Fashion-MNIST): image ROC AUC of
    the raw map maximum and of the border-calibrated score per class, ``n_train`` normal train images of the
    class against ``n_test`` random test images (anomalous: another class). Checks that the calibration,
    measured on MTD tiles, does not cost accuracy on another kind of image."""
    import pyarrow.compute as pc

    from dnnad.vision.specs import get_spec

    spec = get_spec(backbone, size, resize="full", localize=True)
    t = pq.read_table(DATASETS[dataset], columns=["image", "label", "split"])
    rng = np.random.default_rng(0)
    label = t["label"].to_numpy()
    test = np.sort(rng.choice(np.flatnonzero(pc.equal(t["split"], "test").to_numpy(zero_copy_only=False)), n_test,
                              replace=False))
    t0 = time.perf_counter()
    Gq = embed_images(spec, t["image"].take(test).to_pylist())[1].astype(np.float32)
    lines = [f"# --localize one-class on {dataset}: {backbone} at {spec.image_size} px, coreset {coreset:g}", "",
             f"{machine()}; dnnad {git_rev()}; {n_train} normal train images per class, {n_test} random test "
             f"images (seed 0); patch grid {'x'.join(map(str, Gq.shape[1:]))}.", "",
             "| normal class | image ROC AUC, raw maximum | image ROC AUC, border-calibrated |", "|---:|---:|---:|"]
    res = []
    train_rows = np.flatnonzero(pc.equal(t["split"], "train").to_numpy(zero_copy_only=False))
    for c in classes:
        rows = np.sort(rng.choice(train_rows[label[train_rows] == c], n_train, replace=False))
        est = PatchDN2(coreset=coreset, image_size=spec.image_size).fit(
            embed_images(spec, t["image"].take(rows).to_pylist())[1].astype(np.float32))
        maps, y = est.anomaly_maps(Gq), label[test] != c
        res.append((roc_auc_score(y, map_scores(maps, spec.image_size)),
                    roc_auc_score(y, map_scores(maps, spec.image_size, border=est.border_))))
        lines.append(f"| {c} | {res[-1][0]:.4f} | {res[-1][1]:.4f} |")
        print(lines[-1], flush=True)
    mean = np.mean(res, axis=0)
    lines += [f"| mean | {mean[0]:.4f} | {mean[1]:.4f} |", "", f"{time.perf_counter() - t0:.0f} s. Command: "
              f"`.venv/bin/python benchmarks/localise.py --oneclass {dataset} --backbone {backbone} --image-size "
              f"{spec.image_size} --classes {' '.join(map(str, classes))} --coreset {coreset:g}`"]
    print(lines[-3])
    write_results(f"localise-oneclass-{dataset}-{backbone}-{spec.image_size}", lines)


def aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = FPR_LIMIT, steps: int = 2000) -> float:
    """Per-region overlap averaged over defect regions, integrated over FPR 0..limit, divided by limit."""
    normal = np.concatenate([m[~k].ravel() for m, k in zip(maps, masks)])
    allv = np.concatenate([m.ravel() for m in maps])
    thresholds = np.quantile(allv, np.linspace(0, 1, steps))[::-1]
    normal.sort()
    fpr = 1 - np.searchsorted(normal, thresholds, side="left") / len(normal)
    pros = []
    for m, k in zip(maps, masks):
        lab, n = components(k)
        for r in range(1, n + 1):
            v = np.sort(m[lab == r])
            pros.append(1 - np.searchsorted(v, thresholds, side="left") / len(v))
    pro = np.mean(pros, axis=0)
    keep = fpr <= limit
    f, p = np.append(fpr[keep], limit), np.append(pro[keep], np.interp(limit, fpr, pro))
    return float(np.trapezoid(p, f) / limit)


def evaluate(scores: np.ndarray, pixel_maps: list[np.ndarray] | None, masks: list[np.ndarray], kinds: np.ndarray):
    """{group: (image AUROC, pixel AUROC, AUPRO)} for all defects and per kind (each against the free tiles)."""
    out = {}
    for kind in ["all", *sorted(set(kinds) - {"MT_Free"})]:
        rows = np.flatnonzero((kinds == "MT_Free") | ((kinds == kind) if kind != "all" else True))
        y = kinds[rows] != "MT_Free"
        img = roc_auc_score(y, scores[rows])
        if pixel_maps is None:
            out[kind] = (img, None, None)
            continue
        pm, pk = [pixel_maps[i] for i in rows], [masks[i] for i in rows]
        pix = roc_auc_score(np.concatenate([k.ravel() for k in pk]), np.concatenate([m.ravel() for m in pm]))
        out[kind] = (img, pix, aupro(pm, pk))
    return out


def fmt(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "-"


def scale(n: int, coreset: float, backbone: str) -> None:
    """The score job with --localize through the CLI on ``n`` normal images (CIFAR-10 train rows, upsampled to
    the input size) and 100 queries: wall time, stage timings, bank size and the driver's peak RSS beside the
    size of the normal set's patches (what a driver-side fit would hold)."""
    import json
    import subprocess
    import sys
    import tempfile
    import threading

    import psutil
    import pyarrow.compute as pc

    t = pq.read_table(DATASETS["cifar10"], columns=["id", "image", "split"])
    tmp = Path(tempfile.mkdtemp(prefix="localise-scale-"))
    train = t.filter(pc.equal(t["split"], "train")).slice(0, n)
    pq.write_table(train, tmp / "normal.parquet")
    pq.write_table(t.filter(pc.equal(t["split"], "test")).slice(0, 100), tmp / "query.parquet")
    cmd = [sys.executable, "-m", "dnnad.cli", "score", "--normal", str(tmp / "normal.parquet"), "--query",
           str(tmp / "query.parquet"), "--out", str(tmp / "out"), "--backbone", backbone, "--localize",
           "--coreset", str(coreset), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def watch():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.2)

    th = threading.Thread(target=watch)
    th.start()
    _, err = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(err.decode()[-3000:])
    rec = json.loads((tmp / "out" / "run.json").read_text())
    m = rec["model"]
    h, w, d = m["patch_grid"]
    lines = [f"# --localize at scale: {n} normal images ({n * h * w:,} patches of {d} floats), coreset {coreset}",
             "", f"{machine()}; dnnad {git_rev()}; CIFAR-10 train rows upsampled to the input, {backbone}.", "",
             "| normal patches | bank patches | patches' size | driver peak RSS | wall s | stages s |", "|---" * 6 + "|",
             f"| {n * h * w:,} | {m['n_bank']:,} | {n * h * w * d * 4 / 2**30:.2f} GiB | {peak[0] / 2**30:.2f} GiB | "
             f"{wall:.0f} | {', '.join(f'{k} {v:.0f}' for k, v in rec['timings_s'].items())} |", "",
             f"Command: `.venv/bin/python benchmarks/localise.py --scale {n} --coreset {coreset}`"]
    write_results(f"localise-scale-{n}-{coreset:g}", lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--coreset", type=float, nargs="*", default=[0.01, 0.1], help="fractions (1 = the whole bank)")
    ap.add_argument("--spade", type=int, nargs="*", default=[10], help="K nearest normal images (SPADE variant)")
    ap.add_argument("--index", nargs="*", default=["flat"], choices=INDEX_KINDS,
                    help="bank index kinds (compressed: codes in memory, exact re-rank)")
    ap.add_argument("--approximate", action="store_true", help="also score compressed banks from their codes")
    ap.add_argument("--sigma", type=float, default=SIGMA)
    ap.add_argument("--map-dims", type=int, default=None, metavar="N",
                    help="also measure maps from a second search on the first N feature dimensions (the first "
                         "patch stage: 48 for Lite2's blocks.2), the image score staying the full features'")
    ap.add_argument("--stages", default=None, help="patch stages instead of the backbone's, e.g. blocks.2,blocks.3")
    ap.add_argument("--scale", type=int, default=None, metavar="N",
                    help="instead: the score job on N normal images with --coreset (its first value)")
    ap.add_argument("--oneclass", default=None, choices=["cifar10", "fashion-mnist"],
                    help="instead: one-class image ROC AUC on this dataset, raw against border-calibrated")
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 3, 8], help="--oneclass: the normal classes")
    args = ap.parse_args()
    if args.scale:
        return scale(args.scale, args.coreset[0], args.backbone)
    if args.oneclass:
        return oneclass(args.oneclass, args.backbone, args.image_size or 128, args.classes, 200, 500, args.coreset[-1])

    f = features(args.backbone, args.image_size, tuple(args.stages.split(",")) if args.stages else ())
    t, size = f["table"], f["size"]
    split = np.array(t["split"].to_pylist())
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    kinds = np.array(t["label_name"].to_pylist())[test]
    masks = [np.asarray(Image.open(io.BytesIO(b)).convert("L")) > 127 for b in t.take(test)["mask"].to_pylist()]
    G = f["patches"]
    n_grid = G.shape[1] * G.shape[2]
    lines = [f"# Localisation on MTD: {args.backbone} at {size} px (--resize full), patch grid {G.shape[1]}x"
             f"{G.shape[2]}x{G.shape[3]}", "", f"{machine()}; dnnad {git_rev()}; {len(train)} normal tiles, "
             f"{len(test)} test tiles ({', '.join(f'{k} {int((kinds == k).sum())}' for k in sorted(set(kinds)))}); "
             f"features {f['embed_s']:.0f} s for {len(t)} tiles; smoothing sigma {args.sigma} px.", "",
             "| setting | bank patches | bank MB in memory | coreset s | build + LOO threshold s | query ms/image | "
             "image AUROC | pixel AUROC | AUPRO | per kind: image / pixel / AUPRO |", "|---" * 10 + "|"]

    def rows(name, bank, cs, fit_s, q_ms, maps, border, held=None, map_maps=()):
        """The raw maximum's row, then the border-calibrated score's (the product's) with the same maps; for
        each (label, maps) of ``map_maps`` (a second search on the first ``--map-dims`` dimensions), one more
        row: the calibrated score from ``maps`` beside pixel metrics of the second search's maps."""
        res = evaluate(map_scores(maps, size, args.sigma), pixel(maps), masks, kinds)
        row(f"{name}, raw maximum", bank, cs, fit_s, q_ms, res, held)
        cal = evaluate(map_scores(maps, size, args.sigma, border), None, masks, kinds)
        row(f"{name}, border-calibrated", bank, cs, fit_s, q_ms, {k: (v[0], *res[k][1:]) for k, v in cal.items()}, held)
        for label, second in map_maps:
            split = evaluate(map_scores(maps, size, args.sigma), pixel(second), masks, kinds)
            row(f"{name}, border-calibrated, map from {label} on dimensions 0-{args.map_dims - 1}", bank,
                cs, fit_s, q_ms, {k: (v[0], *split[k][1:]) for k, v in cal.items()}, held)

    def row(name, bank, cs, fit_s, q_ms, res, held=None):
        """``held``: bytes a search holds in memory (compressed kinds: the codes); default the float32 patches."""
        a = res["all"]
        kinds_txt = "; ".join(f"{k}: {v[0]:.3f}" + (f" / {v[1]:.3f} / {v[2]:.3f}" if v[1] is not None else "")
                              for k, v in res.items() if k != "all")
        held = held if held is not None else bank * G.shape[3] * 4
        lines.append(f"| {name} | {bank if bank else '-'} | {held / 2**20 if bank else 0:.1f} | "
                     f"{cs} | {fit_s} | {q_ms} | {a[0]:.3f} | {fmt(a[1])} | {fmt(a[2])} | {kinds_txt} |")
        print(lines[-1], flush=True)

    import faiss

    E = l2_normalize(f["emb"])
    D, _ = faiss.knn(E[test], E[train], 2)
    row("global DN2 (k=2)", 0, "-", "-", "-", evaluate(np.sqrt(np.maximum(D, 0)).mean(1), None, masks, kinds))

    def pixel(maps):
        return [map_to_image(m, *k.shape, size, args.sigma) for m, k in zip(maps, masks)]

    def spade_maps(queries, neighbours, dims=None):
        out = []
        for qi, ref in zip(queries, neighbours):
            q, r = G[qi].reshape(-1, G.shape[3]), G[train[ref]].reshape(-1, G.shape[3])
            if dims:
                q, r = np.ascontiguousarray(q[:, :dims]), np.ascontiguousarray(r[:, :dims])
            d, _ = faiss.knn(q, r, 1)
            out.append(np.sqrt(np.maximum(d[:, 0], 0)).reshape(G.shape[1:3]))
        return np.stack(out)

    def sliced_bank_maps(est):
        """Each test patch's distance to its nearest bank patch on the first ``--map-dims`` dimensions."""
        B = np.concatenate([np.asarray(s.vectors) for s in est.index_.shards])[:, :args.map_dims]
        Q = G[test].reshape(-1, G.shape[3])[:, :args.map_dims]
        d, _ = faiss.knn(np.ascontiguousarray(Q), np.ascontiguousarray(B), 1)
        return np.sqrt(np.maximum(d[:, 0], 0)).reshape(len(test), *G.shape[1:3])

    for K in args.spade:
        _, nn = faiss.knn(E[test], E[train], K)
        t0 = time.perf_counter()
        maps = spade_maps(test, nn)
        q_ms = (time.perf_counter() - t0) / len(test) * 1e3
        _, own = faiss.knn(E[train], E[train], K + 1)  # the calibration: each normal tile without itself
        loo = spade_maps(train, [r[r != i][:K] for i, r in enumerate(own)])
        rows(f"SPADE: patches of the {K} nearest normal tiles", K * n_grid, "-", "-", f"{q_ms:.0f}", maps,
             border_calibration(loo), map_maps=[("a second search", spade_maps(test, nn, args.map_dims))]
             if args.map_dims else ())

    banks = [(kind, approx) for kind in args.index
             for approx in ((False, True) if args.approximate and kind in COMPRESSED_KINDS else (False,))]
    for frac in args.coreset:
        for kind, approx in banks:
            t0 = time.perf_counter()
            est = PatchDN2(coreset=frac, image_size=size, sigma=args.sigma, index=kind, approximate=approx).fit(G[train])
            cs = est.coreset_seconds_
            fit_s = time.perf_counter() - t0 - cs
            t0 = time.perf_counter()
            maps = est.anomaly_maps(G[test])
            q_ms = (time.perf_counter() - t0) / len(test) * 1e3
            held = sum(s.vectors.nbytes if s.faiss_bytes is None else s.faiss_bytes.nbytes for s in est.index_.shards)
            name = f"bank, coreset {frac:g}" + ("" if kind == "flat" else f", {kind}" + (" from codes" if approx else ""))
            second = []
            if args.map_dims and kind == "flat":
                second.append(("a second search of the bank", sliced_bank_maps(est)))
                sub = np.ascontiguousarray(G[..., :args.map_dims])
                t0 = time.perf_counter()
                own = PatchDN2(coreset=frac, image_size=size, sigma=args.sigma).fit(sub[train])
                own_s = time.perf_counter() - t0
                second.append((f"a map bank with its own coreset ({own.index_.ntotal} patches, coreset "
                               f"{own.coreset_seconds_:.1f} s, fit {own_s:.1f} s)", own.anomaly_maps(sub[test])))
            rows(name, est.index_.ntotal, f"{cs:.1f}" if frac < 1 else "-", f"{fit_s:.1f}", f"{q_ms:.0f}", maps,
                 est.border_, held, map_maps=second)

    stem = f"localise-mtd-{args.backbone}-{size}" + (f"-{args.stages.replace(',', '+')}" if args.stages else "") + (
        f"-{'+'.join(args.index)}" if args.index != ["flat"] else "") + (f"-map{args.map_dims}" if args.map_dims else "")
    write_results(stem, lines + ["", f"Command: `.venv/bin/python benchmarks/localise.py --backbone {args.backbone}"
                                 f"{f' --image-size {args.image_size}' if args.image_size else ''}"
                                 f"{f' --stages {args.stages}' if args.stages else ''} --coreset "
                                 f"{' '.join(map(str, args.coreset))} --spade {' '.join(map(str, args.spade))}"
                                 f"{' --index ' + ' '.join(args.index) if args.index != ['flat'] else ''}"
                                 f"{' --approximate' if args.approximate else ''}"
                                 f"{f' --map-dims {args.map_dims}' if args.map_dims else ''}`"])


if __name__ == "__main__":
    main()
