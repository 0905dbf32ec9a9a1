"""Audit stage: an embedding cache keyed by image content (sha256) and embedder identity, stored as Parquet parts.

A nightly audit over a corpus that grew by 1 % embeds about 1 %: the embedding workers look each
image's hash up in the cache (shared read-only through Ray's object store) before decoding it.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MARKER = ".dnnad-cache"


def check_cache_root(root: str) -> None:
    """A cache root must be new, empty, or one dnnad made (it holds the marker file): a user's own
    directory is never written into. Raises ValueError with a one-line reason."""
    if not os.path.lexists(root):
        return
    if not os.path.isdir(root):
        raise ValueError(f"{root} exists and is not a directory")
    if os.listdir(root) and not os.path.isfile(os.path.join(root, MARKER)):
        raise ValueError(f"{root} is not empty and is not a dnnad embedding cache (no {MARKER}); "
                         f"name a new or empty directory")


def cache_dir(root: str, backbone: str, image_size: int, weights_identity: str, feature_tag: str = "") -> str:
    """One cache per embedder: backbone, size, weights and how features are read (``BackboneSpec.feature_tag``)."""
    sha = weights_identity.rsplit("sha256:", 1)[-1][:16]
    safe = f"{backbone}-{feature_tag}" if feature_tag else backbone
    safe = safe.replace(":", "_").replace("/", "_").replace("#", "_").replace(",", "_")
    return os.path.join(root, f"{safe}-{image_size}px-{sha}")


class EmbeddingCache:
    """Sorted content hashes (``S64`` hex) and their embeddings, for ``np.searchsorted`` look-ups."""

    def __init__(self, hashes: np.ndarray, X: np.ndarray):
        order = np.argsort(hashes, kind="stable")
        self.hashes = np.ascontiguousarray(hashes[order])
        self.X = np.ascontiguousarray(X[order], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, h: bytes) -> np.ndarray | None:
        i = int(np.searchsorted(self.hashes, h))
        return self.X[i] if i < len(self.hashes) and self.hashes[i] == h else None

    @classmethod
    def load(cls, path: str) -> EmbeddingCache:
        parts = sorted(p for p in os.listdir(path) if p.endswith(".parquet")) if os.path.isdir(path) else []
        if not parts:
            return cls(np.empty(0, dtype="S64"), np.empty((0, 0), dtype=np.float32))
        t = pa.concat_tables([pq.read_table(os.path.join(path, p)) for p in parts])
        emb = t["embedding"].combine_chunks()
        X = emb.values.to_numpy().reshape(len(emb), -1)
        hashes = np.array(t["hash"].to_pylist(), dtype="S64")
        _, first = np.unique(hashes, return_index=True)
        return cls(hashes[first], X[first])


def append_part(path: str, hashes: list[str], X: np.ndarray) -> None:
    """Add newly computed embeddings as one more Parquet part (written aside, then renamed)."""
    if len(hashes) == 0:
        return
    root = os.path.dirname(path)
    os.makedirs(path, exist_ok=True)
    if not os.path.isfile(os.path.join(root, MARKER)):
        with open(os.path.join(root, MARKER), "w") as f:
            f.write("dnnad embedding cache: Parquet parts keyed by image content (sha256)\n")
    table = pa.table({"hash": pa.array(hashes, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.astype(np.float32).ravel()),
                                                                     X.shape[1])})
    name = f"part-{uuid.uuid4().hex}.parquet"
    pq.write_table(table, os.path.join(path, "." + name))
    os.replace(os.path.join(path, "." + name), os.path.join(path, name))
