"""Near-duplicate verification by measurement: planted copies must be grouped, distinct look-alikes must not.

    python benchmarks/duplicates.py --dataset cifar10 --backbone efficientnet_lite2

Takes distinct images of two similar classes (CIFAR-10 cat/dog, Fashion-MNIST t-shirt/shirt), plants copies
of random ones — exact byte copies, JPEG re-encodes (quality 50-95), resizes (0.5-2x), crops (2-10 % of
each side in total), horizontal flips, crop+resize+re-encode at once, small rotations (2-8 degrees),
brightness/contrast changes, solid borders, a text watermark on a 2x JPEG, chains of three resize+re-encode
steps, and the issue's new-user copies (JPEG q60, 2x upscale, 8 % crop resized back); plus four held-out kinds
the default was not chosen on (greyscale, Gaussian noise, Gaussian blur, saturation), reported apart — embeds
everything with
the Ray pipeline (which also computes each image's fingerprint), and groups with the job's own route: the
leave-one-out kNN search of ``fit_reference`` with ``EXTRA_NEIGHBOURS`` more neighbours, then
``find_duplicates`` (ratio test, fingerprints, complete linkage, content hashes) per setting.
Reports recall (copies grouped with their source), pair precision (grouped pairs that are truly one
picture) and the share of distinct images wrongly grouped with another distinct image; plus the
distance distributions the threshold sits between. Embeddings are cached in benchmarks/.cache.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import CACHE, DATASETS, git_rev, machine, write_results
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from dnnad.core.arrays import l2_normalize
from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.duplicates import (
    EXTRA_NEIGHBOURS,
    FINGERPRINT_NEIGHBOURS,
    VECTOR_SHARE,
    find_duplicates,
    fingerprint_neighbours,
)
from dnnad.core.settings import DUPLICATE_RATIO, DUPLICATE_SIMILARITY

CLASSES = {"cifar10": (3, 5), "fashion-mnist": (0, 6)}  # cat/dog; t-shirt/shirt: the closest look-alikes
TUNED = ("exact", "jpeg", "resize", "crop", "flip", "combined", "rotate", "tone", "border", "watermark", "chain",
         "user")  # the kinds the default was chosen on
HELD_OUT = ("grey", "noise", "blur", "colour")  # kinds the default was not chosen on: a check, not a target
KINDS = TUNED + HELD_OUT
RATIOS = (1.5, 2.0, 3.0)
SIMILARITIES = (0.4, 0.5, 0.6, 0.7)
FULL_RATIOS, FULL_SIMILARITIES = (2.0,), (0.4, 0.6)  # --full: a looser setting and the default
BEFORE = 0.3  # the rule this replaced: L2-normalised distance <= 0.30, connected components (single linkage)


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def crop(img: Image.Image, frac: float, rng) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    x, y = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
    return img.crop((x, y, x + w - cw, y + h - ch))


def resize(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BICUBIC)


def plant(data: bytes, kind: str, rng) -> tuple[bytes, str]:
    """A copy of the encoded image ``data`` and a description of what was done to it."""
    if kind == "exact":
        return data, "byte copy"
    img = Image.open(io.BytesIO(data))
    img.load()
    q, f, c = int(rng.integers(50, 96)), float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))), rng.uniform(.02, .1)
    if kind == "jpeg":
        return encode(img, "JPEG", q), f"jpeg q{q}"
    if kind == "resize":
        return encode(resize(img, f)), f"resize x{f:.2f}"
    if kind == "crop":
        return encode(crop(img, c, rng)), f"crop {c:.0%}"
    if kind == "flip":
        return encode(img.transpose(Image.FLIP_LEFT_RIGHT)), "flip"
    if kind == "combined":
        return encode(resize(crop(img, c, rng), f), "JPEG", q), f"crop {c:.0%} + resize x{f:.2f} + jpeg q{q}"
    if kind == "rotate":
        a = float(rng.uniform(2, 8) * rng.choice([-1, 1]))
        return encode(img.convert("RGB").rotate(a, Image.BICUBIC)), f"rotate {a:+.1f} deg"
    if kind == "tone":
        b, k = float(rng.uniform(0.7, 1.3)), float(rng.uniform(0.7, 1.3))
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(img.convert("RGB")).enhance(b)).enhance(k)
        return encode(out), f"brightness x{b:.2f} contrast x{k:.2f}"
    if kind == "border":
        w = max(1, round(min(img.size) * rng.uniform(0.03, 0.1)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        return encode(ImageOps.expand(img.convert("RGB"), w, fill)), f"border {w} px"
    if kind == "watermark":
        out = img.convert("RGB").resize((img.width * 2, img.height * 2), Image.BICUBIC)
        draw = ImageDraw.Draw(out)
        draw.text((int(rng.integers(0, out.width // 3)), int(rng.integers(0, out.height // 2))), "(c) stock",
                  fill=(255, 255, 255))
        return encode(out, "JPEG", 85), "2x + text watermark + jpeg q85"
    if kind == "chain":
        out = img.convert("RGB")
        for _ in range(3):
            out = Image.open(io.BytesIO(encode(resize(out, float(rng.uniform(0.8, 1.25))), "JPEG",
                                               int(rng.integers(60, 91)))))
        return encode(out, "JPEG", 75), "3x (resize + jpeg), jpeg q75"
    if kind == "grey":
        return encode(img.convert("L").convert("RGB"), "JPEG", 90), "greyscale + jpeg q90"
    if kind == "noise":
        sd = float(rng.uniform(4, 10))
        px = np.asarray(img.convert("RGB"), np.float64) + rng.normal(0, sd, (img.height, img.width, 3))
        return encode(Image.fromarray(np.uint8(np.clip(px, 0, 255)))), f"gaussian noise sd {sd:.1f}"
    if kind == "blur":
        rad = float(rng.uniform(0.5, 1.2))
        return encode(img.convert("RGB").filter(ImageFilter.GaussianBlur(rad))), f"gaussian blur r{rad:.2f}"
    if kind == "colour":
        f2 = float(rng.uniform(0.3, 1.7))
        return encode(ImageEnhance.Color(img.convert("RGB")).enhance(f2), "JPEG", 90), f"saturation x{f2:.2f}"
    # the new-user copies: JPEG q60, upscaled 2x, or cropped 8 % and resized back
    pick = int(rng.integers(0, 3))
    if pick == 0:
        return encode(img.convert("RGB"), "JPEG", 60), "jpeg q60"
    if pick == 1:
        return encode(resize(img, 2.0)), "upscale 2x"
    return encode(crop(img, 0.08, rng).resize(img.size, Image.BICUBIC)), "crop 8% + resize back"


def planted_set(dataset: str, per_class: int | None, per_kind: int, seed: int) -> tuple[pa.Table, np.ndarray, list]:
    """(id, image) rows: distinct images then copies; ``source[i]`` = row of the picture row i shows.
    ``per_class`` None: the whole train split (every class) is the set the copies are planted in."""
    rng = np.random.default_rng(seed)
    t = pq.read_table(DATASETS[dataset], columns=["id", "image", "label", "split"])
    t = t.filter(pc.field("split") == "train")
    label = t["label"].to_numpy()
    take = np.arange(t.num_rows) if per_class is None else np.concatenate(
        [np.sort(rng.permutation(np.flatnonzero(label == c))[:per_class]) for c in CLASSES[dataset]])
    ids, images = t["id"].take(take).to_pylist(), t["image"].take(take).to_pylist()
    n = len(ids)
    source, kinds = list(range(n)), [None] * n
    for kind in KINDS:
        for j, s in enumerate(rng.choice(n, per_kind, replace=False)):
            data, what = plant(images[s], kind, rng)
            ids.append(f"copy-{kind}-{j:03d}-of-{ids[s]}"), images.append(data)
            source.append(int(s)), kinds.append((kind, what))
    return pa.table({"id": ids, "image": pa.array(images, pa.binary())}), np.array(source), kinds


def embed_table(t: pa.Table, backbone: str, weights: str, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and fingerprints of the rows of ``t`` in order, through the job's Ray embedding stage."""
    import ray

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.runtime import start_ray
    from dnnad.stages.collect import collect
    from dnnad.stages.embed import embed
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    w = resolve_weights(get_spec(backbone, image_size), weights)
    start_ray(quiet=True)
    ds = ray.data.from_arrow([t.slice(i, 128) for i in range(0, t.num_rows, 128)])
    e = collect(embed(ds, EmbedConfig(backbone, weights, image_size), ray.put(w.state_dict), DEFAULT_MAX_FILE_BYTES,
                      fingerprints=True))
    assert e.errors.num_rows == 0, e.errors
    pos = {i: n for n, i in enumerate(e.ids)}
    order = [pos[i] for i in t["id"].to_pylist()]
    return np.asarray(e.X[order]), np.asarray(e.extra["fingerprint"][order], np.uint8)  # (n, side * side) grids


def single_linkage(X: np.ndarray, neighbours: np.ndarray, threshold: float, hashes: np.ndarray) -> np.ndarray:
    """The rule this replaced, for comparison: candidate pairs within ``threshold``, connected components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from dnnad.core.duplicates import candidate_pairs, number_groups, pair_distances

    a, b = candidate_pairs(neighbours)
    close = pair_distances(X, a, b) <= threshold
    _, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
    a, b = np.concatenate([a[close], np.arange(len(X))]), np.concatenate([b[close], first[inv.ravel()]])
    comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(X), len(X))), directed=False)[1]
    return number_groups(X, comp).group


def evaluate(X: np.ndarray, F: np.ndarray, hashes: np.ndarray, source: np.ndarray, kinds: list,
             n_distinct: int, grid: bool = True, second_search: bool = True) -> list[dict]:
    fit = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS))
    t0 = time.perf_counter()
    more = fingerprint_neighbours(F) if second_search else None  # the job's second candidate search
    search_s = time.perf_counter() - t0
    rows = []
    copies = np.arange(n_distinct, len(X))
    kind_of = np.array([k[0] for k in kinds[n_distinct:]])
    settings = [(r, s) for r in (RATIOS if grid else FULL_RATIOS) for s in (SIMILARITIES if grid else FULL_SIMILARITIES)]
    settings += [("vectors", None), ("before", None)]
    for ratio, sim in settings:
        t0 = time.perf_counter()
        if ratio == "vectors":  # no fingerprints: the ratio test alone, at the default
            g = find_duplicates(X, fit.neighbour_pos, None, DUPLICATE_RATIO, DUPLICATE_SIMILARITY, [hashes]).group
        elif ratio == "before":
            g = single_linkage(X, fit.neighbour_pos, BEFORE, hashes)
        else:
            g = find_duplicates(X, fit.neighbour_pos, F, ratio, sim, [hashes], more=more).group
        took = time.perf_counter() - t0 + (search_s if more is not None and sim is not None else 0.0)
        found = (g[copies] >= 0) & (g[copies] == g[source[copies]])
        grouped = np.flatnonzero(g >= 0)
        # pairs within predicted groups, and those of them showing one picture (same source)
        _, per_group = np.unique(g[grouped], return_counts=True)
        _, per_truth = np.unique(np.stack([g[grouped], source[grouped]]), axis=1, return_counts=True)
        pairs, true_pairs = (per_group * (per_group - 1) // 2).sum(), (per_truth * (per_truth - 1) // 2).sum()
        # distinct images grouped with another distinct image: false merges of look-alikes
        d = np.arange(n_distinct)
        gd = g[d][g[d] >= 0]
        _, cnt = np.unique(gd, return_counts=True)
        merged = int(cnt[cnt >= 2].sum())
        tuned = np.isin(kind_of, TUNED) & (kind_of != "exact")
        row = {"ratio": ratio, "similarity": sim, "seconds": took, "recall": found[tuned].mean(),
               "held_out": found[np.isin(kind_of, HELD_OUT)].mean(),
               "precision": true_pairs / pairs if pairs else 1.0, "distinct_merged": merged / n_distinct}
        row.update({k: found[kind_of == k].mean() for k in KINDS})
        # copies in a group holding another picture; groups and the largest group overall
        sources = {}
        for i in grouped:
            sources.setdefault(g[i], set()).add(source[i])
        row.update(copy_wrong=float(np.mean([len(sources.get(g[c], ())) > 1 for c in copies])),
                   groups=len(per_group), largest=int(per_group.max(initial=0)))
        rows.append(row)
    return rows


def distances(X: np.ndarray, source: np.ndarray, kinds: list, n_distinct: int) -> list[str]:
    Xn = l2_normalize(X, np.float64)
    copies = np.arange(n_distinct, len(X))
    d_copy = np.linalg.norm(Xn[copies] - Xn[source[copies]], axis=1)
    kind_of = np.array([k[0] for k in kinds[n_distinct:]])
    D = np.sqrt(np.maximum(0, 2 - 2 * Xn[:n_distinct] @ Xn[:n_distinct].T))
    np.fill_diagonal(D, np.inf)
    nn = D.min(axis=1)
    q = lambda v, p: float(np.quantile(v, p))  # noqa: E731
    out = ["| pair | n | min | median | 95th pct | max |", "|---|---:|---:|---:|---:|---:|"]
    for k in KINDS:
        v = d_copy[kind_of == k]
        out.append(f"| copy ({k}) → its source | {len(v)} | {v.min():.3f} | {q(v, .5):.3f} | {q(v, .95):.3f} | "
                   f"{v.max():.3f} |")
    out.append(f"| distinct image → nearest other distinct image | {n_distinct} | {nn.min():.3f} | "
               f"{q(nn, .5):.3f} | {q(nn, .95):.3f} | {nn.max():.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the backbone's)")
    ap.add_argument("--per-class", type=int, default=150, help="distinct images per look-alike class")
    ap.add_argument("--per-kind", type=int, default=40, help="planted copies per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding-candidates-only", action="store_true",
                    help="no second candidate search on the fingerprints (the rule before session 21)")
    ap.add_argument("--full", action="store_true",
                    help="plant the copies in the whole train split (50,000 / 60,000 images, every class); only "
                         "the default and the old rule are evaluated, and groups of originals are counted: "
                         "the split holds copies of its own, so review those by eye (the rank job's report)")
    a = ap.parse_args()
    if a.full:
        a.per_class = None
    t0 = time.perf_counter()
    table, source, kinds = planted_set(a.dataset, a.per_class, a.per_kind, a.seed)
    n_distinct = len(source) - a.per_kind * len(KINDS)
    size = f"-{a.image_size}px" if a.image_size else ""
    scope = "full" if a.full else a.per_class
    stem = f"duplicates-{a.dataset}-{a.backbone}{size}-{scope}x{a.per_kind}-s{a.seed}"
    results_stem = stem + ("-embedding-only" if a.embedding_candidates_only else "")
    cache = CACHE / f"{stem}-v6.npz"  # v6: Lanczos-resampled fingerprints
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            X, F = z["X"], z["F"]
    else:
        X, F = embed_table(table, a.backbone, a.weights, a.image_size)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cache, X=X, F=F)
    hashes = np.array([hashlib.sha256(b).hexdigest() for b in table["image"].to_pylist()], dtype="S64")
    rows = evaluate(X, F, hashes, source, kinds, n_distinct, grid=not a.full,
                    second_search=not a.embedding_candidates_only)
    cmd = (f"python benchmarks/duplicates.py --dataset {a.dataset} --backbone {a.backbone} --weights {a.weights} "
           + (f"--image-size {a.image_size} " if a.image_size else "")
           + ("--full " if a.full else f"--per-class {a.per_class} ") + f"--per-kind {a.per_kind} --seed {a.seed}"
           + (" --embedding-candidates-only" if a.embedding_candidates_only else ""))
    lines = [f"# Near-duplicates, {a.dataset}: {a.backbone}{size} ({a.weights} weights)", "",
             f"- command: `{cmd}`", f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}",
             f"- {n_distinct} " + ("train images (the whole split, which holds copies of its own: pair precision and "
                                    "distinct merged count those as errors)" if a.full else
                                    f"distinct train images of classes {CLASSES[a.dataset]}")
             + f" + {len(X) - n_distinct} "
             f"planted copies ({a.per_kind} per kind); candidates: k=2 + {EXTRA_NEIGHBOURS} leave-one-out "
             f"neighbours" + ("" if a.embedding_candidates_only else
                              f" + {FINGERPRINT_NEIGHBOURS} by fingerprint (the default rule's; grouping s includes "
                              "that search)") + f"; {time.perf_counter() - t0:.0f} s", "",
             f"Default: ratio {DUPLICATE_RATIO}, similarity {DUPLICATE_SIMILARITY} (marked *).", "",
             "| ratio | similarity | recall (tuned kinds, non-exact) | recall (held-out kinds) | pair precision | "
             "distinct merged | grouping s | " + " | ".join(KINDS) + " |",
             "|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(KINDS)]
    for r in rows:
        star = "*" if (r["ratio"], r["similarity"]) == (DUPLICATE_RATIO, DUPLICATE_SIMILARITY) else ""
        ratio, sim = (f"{r['ratio']:.2f}{star}", f"{r['similarity']:.2f}{star}") if r["similarity"] else (
            ("vectors only", f"(ratio {DUPLICATE_RATIO * VECTOR_SHARE:.3f})") if r["ratio"] == "vectors"
            else ("before", f"(distance <= {BEFORE:.2f}, single linkage)"))
        lines.append(f"| {ratio} | {sim} | {r['recall']:.3f} | {r['held_out']:.3f} | "
                     f"{r['precision']:.3f} | {r['distinct_merged']:.3f} | {r['seconds']:.2f} | "
                     + " | ".join(f"{r[k]:.3f}" for k in KINDS) + " |")
    lines += ["", "| setting | copies in a group with another picture | groups | largest group |", "|---|---:|---:|---:|"]
    default = (None, DUPLICATE_SIMILARITY), ("vectors", "before", DUPLICATE_RATIO)
    lines += [f"| {r['ratio']} / {r['similarity']} | {r['copy_wrong']:.3f} | {r['groups']} | {r['largest']} |" for r in rows
              if a.full or r["similarity"] in default[0] and r["ratio"] in default[1]]
    if not a.full:  # (n distinct)^2 distances
        lines += ["", "L2-normalised embedding distances:", "", *distances(X, source, kinds, n_distinct)]
    write_results(results_stem, lines)


if __name__ == "__main__":
    main()
