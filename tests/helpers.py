"""Shared test helpers: real CIFAR rows from ../shared/data, image folders (``make_corpus``) and Parquet files
on disk, and the repository's ``ROOT``."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository: the one definition every test imports
SHARED_DATA = Path(os.environ.get("DNNAD_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR = SHARED_DATA / "cifar10-jpeg.parquet"

# Fast mechanics runs: random-init ResNet-18 on 32 px crops. Accuracy tests use the pretrained Lite2.
FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--quiet"]
# Runs slow enough to be killed between partitions: 200 query images make 5 partitions of 40.
RESUMABLE = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "8",
             "--score-batch-size", "8", "--partition-rows", "40", "--quiet"]


def kill_once(cmd: list[str], committed: Callable[[], bool], timeout: float = 300) -> None:
    """Start the job ``cmd`` and SIGKILL it, with the Ray it started in-process, once ``committed()`` holds."""
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + timeout
    while not committed():
        assert run.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def need_shared_data() -> None:
    if not CIFAR.is_file():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set DNNAD_SHARED_DATA)")


def cifar_rows(split: str, label: int | None, n: int, offset: int = 0) -> pa.Table:
    need_shared_data()
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


@dataclass
class Corpus:
    """Image folders on disk: ``normal`` (train images of one class), ``query`` (test images of every class, then
    the damaged files); ``good`` and ``bad`` are the query's ids (paths relative to ``query``)."""

    root: Path
    normal: Path
    query: Path
    good: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def damaged(name: str, jpeg: bytes) -> bytes:
    """What a damaged file called ``name`` holds: "truncated" the first third of a real JPEG, "empty" nothing,
    anything else text (not an image)."""
    stem = Path(name).stem
    if "truncated" in stem:
        return jpeg[: len(jpeg) // 3]
    return b"" if "empty" in stem else b"this is not an image\n"


def make_corpus(root: Path, normal: int = 0, query: int = 0, bad: Iterable[str] = (), *, label: int = 1,
                normal_offset: int = 0, query_offset: int = 0) -> Corpus:
    """The one corpus-folder factory: ``normal`` train images of class ``label`` (from ``normal_offset``) in
    ``root/normal``, ``query`` test images of every class (from ``query_offset``) in ``root/query`` and, beside
    them, one damaged file per name in ``bad`` (see ``damaged``). A folder with nothing to hold is not made;
    calling it again on the same root adds files."""
    root = Path(root)
    c = Corpus(root, root / "normal", root / "query")
    if normal:
        c.normal.mkdir(parents=True, exist_ok=True)
        write_folder(c.normal, cifar_rows("train", label, normal, offset=normal_offset))
    bad = list(bad)
    if query or bad:
        c.query.mkdir(parents=True, exist_ok=True)
        c.good = write_folder(c.query, cifar_rows("test", None, query, offset=query_offset)) if query else []
        jpeg = (c.query / c.good[0]).read_bytes() if c.good else cifar_rows("test", None, 1)["image"][0].as_py()
        for name in bad:
            (c.query / name).parent.mkdir(parents=True, exist_ok=True)
            (c.query / name).write_bytes(damaged(name, jpeg))
        c.bad = bad
    return c


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read_scores(out: Path, name: str = "scores") -> pa.Table:
    return pq.read_table(out / name).sort_by("id")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` (links and special files by their kind) and its sha256: to prove a run
    changed nothing it does not own."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


def planted(n_normal: int = 380, n_anom: int = 20, d: int = 16, seed: int = 0):
    """Embeddings with a planted structure: a tight normal cloud and far-away anomalies."""
    rng = np.random.default_rng(seed)
    Xn = rng.normal(0, 1, size=(n_normal, d))
    Xa = rng.normal(0, 1, size=(n_anom, d)) + rng.choice([-6, 6], size=(n_anom, d))
    X = np.vstack([Xn, Xa]).astype(np.float32)
    y = np.r_[np.zeros(n_normal), np.ones(n_anom)]
    perm = rng.permutation(len(X))
    return X[perm], y[perm]
