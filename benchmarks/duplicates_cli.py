"""Near-duplicates through the CLI, as a new user meets them: a folder of distinct test images as PNG files plus
copies of kinds that ``benchmarks/duplicates.py`` does not plant (so the default was not chosen on them), run
through ``jobs/rank.py`` with every default. Prints how many copies landed in a group with their source, and
how many groups hold two different pictures.

    python benchmarks/duplicates_cli.py --dataset cifar10 --images 120 --per-kind 6
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import DATASETS, ROOT, git_rev, machine, write_results
from PIL import Image, ImageEnhance, ImageFilter, ImageOps


def grey_crop(img: Image.Image, rng) -> tuple[Image.Image, str]:
    w, h = img.size
    return img.convert("L").crop((1, 1, w - 1, h - 1)).convert("RGB"), "JPEG"


def noise_sharpen(img: Image.Image, rng) -> tuple[Image.Image, str]:
    px = np.asarray(img, np.float64) + rng.normal(0, 6, (img.height, img.width, 3))
    out = Image.fromarray(np.uint8(np.clip(px, 0, 255))).filter(ImageFilter.SHARPEN)
    return out, "PNG"


def upscale_blur(img: Image.Image, rng) -> tuple[Image.Image, str]:
    out = img.resize((img.width * 3, img.height * 3), Image.LANCZOS).filter(ImageFilter.GaussianBlur(1.5))
    return out, "WEBP"


def shift_gamma(img: Image.Image, rng) -> tuple[Image.Image, str]:
    px = np.pad(np.asarray(img), ((3, 0), (3, 0), (0, 0)), mode="reflect")[:img.height, :img.width]
    px = 255 * (px / 255.0) ** 0.8
    return Image.fromarray(np.uint8(np.clip(px, 0, 255))), "PNG"


def posterise_colour(img: Image.Image, rng) -> tuple[Image.Image, str]:
    return ImageEnhance.Color(ImageOps.posterize(img, 5)).enhance(1.4), "PNG"


KINDS = {grey_crop: "greyscale + 1 px crop, JPEG", noise_sharpen: "Gaussian noise sd 6 + sharpen",
         upscale_blur: "3x Lanczos upscale + blur, WebP", shift_gamma: "3 px shift (reflected edges) + gamma 0.8",
         posterise_colour: "5-bit posterise + colour x1.4"}  # each returns the copy and the format it is saved in


def build_folder(folder: Path, dataset: str, n_images: int, per_kind: int, seed: int) -> dict[str, str]:
    """Writes ``n_images`` distinct test images and ``per_kind`` copies of each kind; returns copy id -> source id."""
    rng = np.random.default_rng(seed)
    t = pq.read_table(DATASETS[dataset], columns=["image", "split"]).filter(pc.field("split") == "test")
    take = np.sort(rng.choice(t.num_rows, n_images, replace=False))
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in t["image"].take(take).to_pylist()]
    for i, img in enumerate(images):
        img.save(folder / f"img{i:04d}.png")
    source = {}
    for kind in KINDS:
        for j, s in enumerate(rng.choice(n_images, per_kind, replace=False)):
            out, fmt = kind(images[s], rng)
            name = f"copy-{kind.__name__}-{j}.{fmt.lower()}"
            out.save(folder / name, format=fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}))
            source[name] = f"img{s:04d}.png"
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist"])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--per-kind", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "out"
        folder.mkdir()
        source = build_folder(folder, a.dataset, a.images, a.per_kind, a.seed)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "jobs" / "rank.py"), "--data", str(folder), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        took = time.perf_counter() - t0
        groups = pq.read_table(out / "duplicates").to_pandas()
    group_of = dict(zip(groups["id"], groups["group_id"]))
    picture = {i: source.get(i, i) for i in groups["id"]}  # the picture each grouped row shows
    pictures = groups.assign(picture=groups["id"].map(picture)).groupby("group_id")["picture"].nunique()
    lines = [f"# Near-duplicates through the CLI: {a.dataset}, {a.images} images + {len(source)} copies",
             "", f"- command: `python benchmarks/duplicates_cli.py --dataset {a.dataset} --images {a.images} "
             f"--per-kind {a.per_kind} --seed {a.seed}` (`jobs/rank.py --data DIR --out OUT`, every default)",
             f"- machine: {machine()}; date {dt.date.today()}; commit {git_rev()}; rank job {took:.0f} s", "",
             "| kind | copies grouped with their source |", "|---|---:|"]
    total = 0
    for kind, what in KINDS.items():
        names = [n for n in source if n.startswith(f"copy-{kind.__name__}-")]
        found = sum(n in group_of and group_of[n] == group_of.get(source[n]) for n in names)
        total += found
        lines.append(f"| {what} | {found} / {len(names)} |")
    lines += [f"| **all** | **{total} / {len(source)}** |", "",
              f"{len(pictures)} groups; groups holding two different pictures: {int((pictures > 1).sum())}"]
    for g in pictures.index[pictures > 1]:  # for review by eye: the test split may hold copies of its own
        lines.append(f"- group {g}: " + ", ".join(sorted(groups.loc[groups["group_id"] == g, "id"])))
    write_results(f"duplicates-cli-{a.dataset}-{a.images}x{a.per_kind}-s{a.seed}", lines)


if __name__ == "__main__":
    main()
