"""Near-duplicate threshold by measurement: planted copies must be grouped, distinct look-alikes must not.

    python benchmarks/duplicates.py --dataset cifar10 --backbone efficientnet_lite2

Takes distinct images of two similar classes (CIFAR-10 cat/dog, Fashion-MNIST t-shirt/shirt), plants copies
of random ones — exact byte copies, JPEG re-encodes (quality 50-95), resizes (0.5-2x), crops (2-10 % of
each side in total), horizontal flips, and all of crop+resize+re-encode at once — embeds everything with
the Ray pipeline, and groups with the job's own route: the leave-one-out kNN search of ``fit_reference``
with ``EXTRA_NEIGHBOURS`` more neighbours, then ``find_duplicates`` (with content hashes) per threshold.
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
from PIL import Image

from dnnad.core.arrays import l2_normalize
from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.duplicates import EXTRA_NEIGHBOURS, find_duplicates

CLASSES = {"cifar10": (3, 5), "fashion-mnist": (0, 6)}  # cat/dog; t-shirt/shirt: the closest look-alikes
KINDS = ("exact", "jpeg", "resize", "crop", "flip", "combined")
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


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
    return encode(resize(crop(img, c, rng), f), "JPEG", q), f"crop {c:.0%} + resize x{f:.2f} + jpeg q{q}"


def planted_set(dataset: str, per_class: int, per_kind: int, seed: int) -> tuple[pa.Table, np.ndarray, list]:
    """(id, image) rows: distinct images then copies; ``source[i]`` = row of the picture row i shows."""
    rng = np.random.default_rng(seed)
    t = pq.read_table(DATASETS[dataset], columns=["id", "image", "label", "split"])
    t = t.filter(pc.field("split") == "train")
    label = t["label"].to_numpy()
    take = np.concatenate([np.sort(rng.permutation(np.flatnonzero(label == c))[:per_class])
                           for c in CLASSES[dataset]])
    ids, images = t["id"].take(take).to_pylist(), t["image"].take(take).to_pylist()
    n = len(ids)
    source, kinds = list(range(n)), [None] * n
    for kind in KINDS:
        for j, s in enumerate(rng.choice(n, per_kind, replace=False)):
            data, what = plant(images[s], kind, rng)
            ids.append(f"copy-{kind}-{j:03d}-of-{ids[s]}"), images.append(data)
            source.append(int(s)), kinds.append((kind, what))
    return pa.table({"id": ids, "image": pa.array(images, pa.binary())}), np.array(source), kinds


def embed_table(t: pa.Table, backbone: str, weights: str) -> np.ndarray:
    """Embeddings of the rows of ``t`` in order, through the job's Ray embedding stage."""
    import ray

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.runtime import start_ray
    from dnnad.stages.collect import collect
    from dnnad.stages.embed import embed
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    w = resolve_weights(get_spec(backbone, None), weights)
    start_ray(quiet=True)
    ds = ray.data.from_arrow([t.slice(i, 128) for i in range(0, t.num_rows, 128)])
    e = collect(embed(ds, EmbedConfig(backbone, weights), ray.put(w.state_dict), DEFAULT_MAX_FILE_BYTES))
    assert e.errors.num_rows == 0, e.errors
    pos = {i: n for n, i in enumerate(e.ids)}
    return e.X[[pos[i] for i in t["id"].to_pylist()]]


def evaluate(X: np.ndarray, hashes: np.ndarray, source: np.ndarray, kinds: list, n_distinct: int) -> list[dict]:
    fit = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS))
    rows = []
    copies = np.arange(n_distinct, len(X))
    kind_of = np.array([k[0] for k in kinds[n_distinct:]])
    for thr in THRESHOLDS:
        g = find_duplicates(X, fit.neighbour_pos, thr, [hashes]).group
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
        row = {"threshold": thr, "recall": found[kind_of != "exact"].mean(),
               "precision": true_pairs / pairs if pairs else 1.0, "distinct_merged": merged / n_distinct}
        row.update({k: found[kind_of == k].mean() for k in KINDS})
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
    ap.add_argument("--per-class", type=int, default=150, help="distinct images per look-alike class")
    ap.add_argument("--per-kind", type=int, default=40, help="planted copies per kind")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    table, source, kinds = planted_set(a.dataset, a.per_class, a.per_kind, a.seed)
    n_distinct = 2 * a.per_class
    stem = f"duplicates-{a.dataset}-{a.backbone}-{a.per_class}x{a.per_kind}-s{a.seed}"
    cache = CACHE / f"{stem}.npy"
    if cache.exists():
        X = np.load(cache, allow_pickle=False)
    else:
        X = embed_table(table, a.backbone, a.weights)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(cache, X)
    hashes = np.array([hashlib.sha256(b).hexdigest() for b in table["image"].to_pylist()], dtype="S64")
    rows = evaluate(X, hashes, source, kinds, n_distinct)
    cmd = (f"python benchmarks/duplicates.py --dataset {a.dataset} --backbone {a.backbone} --weights {a.weights} "
           f"--per-class {a.per_class} --per-kind {a.per_kind} --seed {a.seed}")
    lines = [f"# Near-duplicates, {a.dataset}: {a.backbone} ({a.weights} weights)", "",
             f"- command: `{cmd}`", f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}",
             f"- {n_distinct} distinct train images of classes {CLASSES[a.dataset]} + {len(X) - n_distinct} "
             f"planted copies ({a.per_kind} per kind); candidates: k=2 + {EXTRA_NEIGHBOURS} leave-one-out "
             f"neighbours; {time.perf_counter() - t0:.0f} s", "",
             "| threshold | recall (non-exact) | pair precision | distinct merged | "
             + " | ".join(KINDS) + " |", "|---:|---:|---:|---:|" + "---:|" * len(KINDS)]
    for r in rows:
        lines.append(f"| {r['threshold']:.2f} | {r['recall']:.3f} | {r['precision']:.3f} | "
                     f"{r['distinct_merged']:.3f} | " + " | ".join(f"{r[k]:.3f}" for k in KINDS) + " |")
    lines += ["", "L2-normalised embedding distances:", "", *distances(X, source, kinds, n_distinct)]
    write_results(stem, lines)


if __name__ == "__main__":
    main()
