"""Benchmark helpers: dataset subsampling and an embedding cache keyed by dataset, backbone, weights and size."""
from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("DNNAD_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {"cifar10": SHARED / "cifar10-jpeg.parquet", "fashion-mnist": SHARED / "fashion-mnist.parquet",
            "mtd": SHARED / "mtd.parquet"}  # MTD: one normal class (label 0, MT_Free), defect kinds in test only
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"


def write_results(stem: str, lines: list[str]) -> Path:
    """Print a benchmark's Markdown lines and write them to ``benchmarks/results/<stem>.md``; returns that folder."""
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    return RESULTS


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({model}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def subsample(dataset: str, train_per_class: int | None, test_n: int | None, seed: int = 0) -> pa.Table:
    """id, label, label_name, split of a fixed-seed subsample: N train rows per class present in the train split
    and M test rows (None, 0 or more than there are: all of them)."""
    t = pq.read_table(DATASETS[dataset], columns=["id", "label", "label_name", "split"])
    rng = np.random.default_rng(seed)
    keep = []
    split, label = t["split"].to_numpy(zero_copy_only=False), t["label"].to_numpy()
    for c in np.unique(label[split == "train"]):
        idx = np.flatnonzero((split == "train") & (label == c))
        keep.append(np.sort(rng.permutation(idx)[: train_per_class or len(idx)]))
    test = np.flatnonzero(split == "test")
    keep.append(np.sort(rng.permutation(test)[: test_n or len(test)]))
    return t.take(np.concatenate(keep))


def cached_embeddings(dataset: str, ids: list[str], backbone: str, weights: str, image_size: int | None,
                      batch_size: int = 64, decode: str = "exact") -> np.ndarray:
    """Embeddings of ``ids`` in order; only ids missing from the cache are embedded (by the Ray pipeline)."""
    import ray

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.runtime import start_ray
    from dnnad.stages.collect import collect
    from dnnad.stages.embed import embed
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    spec = get_spec(backbone, image_size, decode=decode)
    w = resolve_weights(spec, weights)
    sha = w.identity.rsplit("sha256:", 1)[-1][:12] if "sha256:" in w.identity else w.identity
    path = CACHE / (f"{dataset}-{backbone.replace(':', '_').replace('/', '_')}-{sha}-{spec.image_size}"
                    f"{'-' + decode if decode != 'exact' else ''}.parquet")
    have = pq.read_table(path) if path.exists() else None
    known = set(have["id"].to_pylist()) if have is not None else set()
    missing = [i for i in dict.fromkeys(ids) if i not in known]
    if missing:
        start_ray(quiet=True)
        t = pq.read_table(DATASETS[dataset], columns=["id", "image"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(missing)))
        ds = ray.data.from_arrow([t.slice(i, 256) for i in range(0, t.num_rows, 256)])
        e = collect(embed(ds, EmbedConfig(backbone, weights, image_size, batch_size, decode=decode), ray.put(w.state_dict),
                          DEFAULT_MAX_FILE_BYTES))
        assert e.errors.num_rows == 0, e.errors
        new = pa.table({"id": pa.array(e.ids.tolist(), pa.string()),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.X.ravel()), e.X.shape[1])})
        have = new if have is None else pa.concat_tables([have, new])
        CACHE.mkdir(parents=True, exist_ok=True)
        pq.write_table(have, path)
    pos = {i: n for n, i in enumerate(have["id"].to_pylist())}
    flat = have["embedding"].combine_chunks()
    X = flat.values.to_numpy().reshape(len(flat), -1)
    return np.ascontiguousarray(X[[pos[i] for i in ids]], dtype=np.float32)


def raw_pixels(dataset: str, ids: list[str], size: int = 32) -> np.ndarray:
    """Raw-pixel features (RGB, size x size, scaled to [0, 1]) for the paper's raw-kNN baseline."""
    from PIL import Image

    t = pq.read_table(DATASETS[dataset], columns=["id", "image"])
    t = t.filter(pc.is_in(t["id"], value_set=pa.array(ids)))
    by_id = dict(zip(t["id"].to_pylist(), t["image"].to_pylist()))
    return np.stack([np.asarray(Image.open(io.BytesIO(by_id[i])).convert("RGB").resize((size, size)),
                                dtype=np.float32).ravel() / 255.0 for i in ids])


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


TAP_LAYERS = ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "final")  # EfficientNet-Lite stages


def cached_taps(dataset: str, ids: list[str], backbone: str, weights: str, image_size: int | None,
                resize: str = "crop", flip: bool = False, layers: tuple[str, ...] = TAP_LAYERS,
                batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """Pooled features of ``ids`` by layer, one dict per view (the image, then its flip with ``flip``),
    unnormalised: every ``--layers`` / ``--tta`` variant is then ``vision.backbones.embed_from_taps`` of
    these, without another forward pass. Computed in this process with dnnad's FeatureExtractor and
    preprocessing; cached in benchmarks/.cache (only missing ids are embedded)."""
    import torch

    from dnnad.vision.backbones import FeatureExtractor, preprocess_fn
    from dnnad.vision.decode import decode_image
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    spec = get_spec(backbone, image_size, layers=layers, resize=resize)
    w = resolve_weights(spec, weights)
    sha = w.identity.rsplit("sha256:", 1)[-1][:12] if "sha256:" in w.identity else w.identity
    views = ("image", "flip") if flip else ("image",)
    path = CACHE / (f"{dataset}-{backbone}-{sha}-{spec.image_size}-{resize}-taps-{'+'.join(layers)}"
                    f"{'-flip' if flip else ''}.parquet")
    have = pq.read_table(path) if path.exists() else None
    known = set(have["id"].to_pylist()) if have is not None else set()
    missing = [i for i in dict.fromkeys(ids) if i not in known]
    if missing:
        fe = FeatureExtractor(spec, w.state_dict, device="cpu", threads=os.cpu_count())
        pre = preprocess_fn(spec)
        t = pq.read_table(DATASETS[dataset], columns=["id", "image"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(missing)))
        cols: dict[str, list] = {f"{v}:{n}": [] for v in views for n in layers}
        t0, images = time.perf_counter(), t["image"].to_pylist()
        for s in range(0, len(images), batch_size):
            x = torch.stack([pre(decode_image(b)) for b in images[s:s + batch_size]])
            for v in views:
                for n, f in fe.taps(x if v == "image" else torch.flip(x, dims=[3])).items():
                    if n in layers:
                        cols[f"{v}:{n}"].append(f)
        print(f"embedded {len(images)} images ({'+'.join(views)}) in {time.perf_counter() - t0:.0f}s", flush=True)
        new = pa.table({"id": t["id"], **{c: _fixed(np.concatenate(v)) for c, v in cols.items()}})
        have = new if have is None else pa.concat_tables([have, new])
        CACHE.mkdir(parents=True, exist_ok=True)
        pq.write_table(have, path)
    pos = {i: n for n, i in enumerate(have["id"].to_pylist())}
    take = np.array([pos[i] for i in ids])

    def col(c: str) -> np.ndarray:
        flat = have[c].combine_chunks()
        return np.ascontiguousarray(flat.values.to_numpy().reshape(len(flat), -1)[take], dtype=np.float32)

    return [{n: col(f"{v}:{n}") for n in layers} for v in views]


def _fixed(X: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(X, np.float32).ravel()), X.shape[1])
