"""Shared fixtures: one real local Ray per session, real image folders and Parquet files on disk."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

SHARED_DATA = Path(os.environ.get("DNNAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CIFAR = SHARED_DATA / "cifar10-jpeg.parquet"

# Fast mechanics runs: random-init ResNet-18 on 32 px crops. Accuracy tests use the pretrained Lite2.
FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--quiet"]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def cifar_rows(split: str, label: int | None, n: int, offset: int = 0) -> pa.Table:
    t = pq.read_table(CIFAR)
    mask = pc.field("split") == split
    if label is not None:
        mask = mask & (pc.field("label") == label)
    return t.filter(mask).slice(offset, n)


def write_folder(root: Path, table: pa.Table, sub: str = "") -> list[str]:
    """Write the rows' JPEG bytes as files; returns their ids relative to ``root``."""
    ids = []
    for r in table.to_pylist():
        rel = os.path.join(sub, r["id"].replace("/", "_") + ".jpg") if sub else r["id"].replace("/", "_") + ".jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(r["image"])
        ids.append(rel)
    return ids


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A normal folder (120 automobiles) and a query folder (200 test images + 3 corrupt files)."""
    root = tmp_path_factory.mktemp("corpus")
    normal, query = root / "normal", root / "query"
    normal.mkdir(), query.mkdir()
    write_folder(normal, cifar_rows("train", 1, 120))
    good = write_folder(query, cifar_rows("test", None, 200))
    jpeg = (query / good[0]).read_bytes()
    (query / "corrupt" / "truncated.jpg").parent.mkdir()
    (query / "corrupt" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (query / "corrupt" / "text.png").write_text("this is not an image\n")
    (query / "corrupt" / "empty.jpg").write_bytes(b"")
    return {"normal": normal, "query": query, "good": good,
            "bad": ["corrupt/truncated.jpg", "corrupt/text.png", "corrupt/empty.jpg"]}


def read_scores(out: Path, name: str = "scores") -> pa.Table:
    return pq.read_table(out / name).sort_by("id")


def planted(n_normal: int = 380, n_anom: int = 20, d: int = 16, seed: int = 0):
    """Embeddings with a planted structure: a tight normal cloud and far-away anomalies."""
    rng = np.random.default_rng(seed)
    Xn = rng.normal(0, 1, size=(n_normal, d))
    Xa = rng.normal(0, 1, size=(n_anom, d)) + rng.choice([-6, 6], size=(n_anom, d))
    X = np.vstack([Xn, Xa]).astype(np.float32)
    y = np.r_[np.zeros(n_normal), np.ones(n_anom)]
    perm = rng.permutation(len(X))
    return X[perm], y[perm]


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
