"""Sharded exact/approximate kNN index over float32 vectors, with a deterministic exact refine.

A shard holds a contiguous slice of the reference set: its vectors (always, as a plain float32
array, so that Ray can share one read-only copy between actors) and, for approximate kinds, a
serialized FAISS index over them. A search asks every shard for candidates, merges them and
re-ranks the candidates by exact float64 Euclidean distance with ties broken by position, so
results do not depend on how the reference set was split.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ..config import INDEX_KINDS


@dataclass(frozen=True)
class Shard:
    """One slice of the reference set: rows ``offset .. offset + len(vectors)``."""

    offset: int
    vectors: np.ndarray  # (n, d) float32, C-contiguous
    faiss_bytes: np.ndarray | None = None  # serialized approximate index, uint8


def as_float32(X: np.ndarray) -> np.ndarray:
    """(n, d) C-contiguous float32 view or copy of ``X``; rejects NaN/inf."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array of shape (n, d), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain NaN or inf")
    return X


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) bounds splitting ``n`` rows into at most ``n_shards`` non-empty parts."""
    n_shards = max(1, min(int(n_shards), n))
    edges = np.linspace(0, n, n_shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def build_shard(vectors: np.ndarray, offset: int, kind: str = "flat", nlist: int = 0, hnsw_m: int = 32) -> Shard:
    """Build one shard; ``kind`` is flat (exact), ivf (IVF-Flat) or hnsw (HNSW-Flat)."""
    X = as_float32(vectors)
    if kind == "flat":
        return Shard(offset, X)
    d = X.shape[1]
    if kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(len(X))))
        nlist = min(nlist, len(X))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = 1234
        index.train(X)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    index.add(X)
    return Shard(offset, X, faiss.serialize_index(index))


class ShardedIndex:
    """kNN over a list of shards that together cover rows ``0 .. ntotal``."""

    def __init__(self, shards: list[Shard], nprobe: int = 16, ef_search: int = 64):
        if not shards:
            raise ValueError("an index needs at least one shard")
        self.shards = sorted(shards, key=lambda s: s.offset)
        self.d = int(self.shards[0].vectors.shape[1])
        self.ntotal = int(sum(len(s.vectors) for s in self.shards))
        expected = 0
        for s in self.shards:
            if s.offset != expected or s.vectors.shape[1] != self.d:
                raise ValueError("shards must be contiguous and share one dimension")
            expected += len(s.vectors)
        self._approx = []
        for s in self.shards:
            if s.faiss_bytes is None:
                self._approx.append(None)
                continue
            index = faiss.deserialize_index(s.faiss_bytes)
            if hasattr(index, "nprobe"):
                index.nprobe = nprobe
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = ef_search
            self._approx.append(index)

    @property
    def kind(self) -> str:
        index = self._approx[0]
        if index is None:
            return "flat"
        return "hnsw" if hasattr(index, "hnsw") else "ivf"

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any shape of int64 positions, all valid) as float32, shape idx.shape + (d,)."""
        flat = idx.reshape(-1)
        out = np.empty((len(flat), self.d), dtype=np.float32)
        for s in self.shards:
            m = (flat >= s.offset) & (flat < s.offset + len(s.vectors))
            out[m] = s.vectors[flat[m] - s.offset]
        return out.reshape(idx.shape + (self.d,))

    def _candidates(self, Xq: np.ndarray, kk: int) -> np.ndarray:
        """Positions of up to ``kk`` nearest rows from every shard, (nq, n_shards * kk), -1 for none."""
        parts = []
        for s, approx in zip(self.shards, self._approx):
            kk_s = min(kk, len(s.vectors))
            if approx is None:
                _, I = faiss.knn(Xq, s.vectors, kk_s)
            else:
                _, I = approx.search(Xq, kk_s)
            I = np.where(I >= 0, I + s.offset, -1)
            parts.append(I)
        return np.concatenate(parts, axis=1)

    def search(self, Xq: np.ndarray, k: int, exclude: list[np.ndarray] | None = None,
               margin: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Exact Euclidean distances (nq, k) float64 and positions (nq, k) int64 of the k nearest rows.

        ``exclude[i]`` lists positions that may not be neighbours of query i (itself, its
        duplicates). Candidates are over-fetched by ``margin`` and re-ranked in float64 so that
        float32 rounding in different shard layouts cannot change the answer.
        """
        Xq = as_float32(Xq)
        if Xq.shape[1] != self.d:
            raise ValueError(f"query dimension {Xq.shape[1]} does not match index dimension {self.d}")
        n_excl = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        if k < 1 or k + n_excl > self.ntotal:
            raise ValueError(f"k={k} needs at least {k + n_excl} reference rows, index has {self.ntotal}")
        nq = len(Xq)
        if nq == 0:
            return np.empty((0, k)), np.empty((0, k), dtype=np.int64)
        I = self._candidates(Xq, min(self.ntotal, k + n_excl + margin))
        valid = I >= 0
        if exclude is not None:
            for i, e in enumerate(exclude):
                if len(e):
                    valid[i] &= ~np.isin(I[i], e)
        safe = np.where(valid, I, 0)
        diff = self.vectors(safe).astype(np.float64) - Xq[:, None, :].astype(np.float64)
        D = np.sqrt(np.einsum("qcd,qcd->qc", diff, diff))
        D[~valid] = np.inf
        # Deduplicate (an approximate index may repeat a row) and order by (distance, position).
        order = np.lexsort((safe, D), axis=1)
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(safe, order, 1)
        dup = np.zeros_like(valid)
        dup[:, 1:] = (I[:, 1:] == I[:, :-1]) & np.isfinite(D[:, 1:])
        D[dup] = np.inf
        order = np.lexsort((I, D), axis=1)[:, :k]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        if not np.isfinite(D).all():
            raise RuntimeError("index returned fewer than k neighbours; increase nprobe/ef_search")
        return D, I.astype(np.int64)


def build_index(X: np.ndarray, n_shards: int = 1, kind: str = "flat", **params) -> ShardedIndex:
    """Build all shards in this process (the Ray pipeline builds them as parallel tasks)."""
    X = as_float32(X)
    return ShardedIndex([build_shard(X[a:b], a, kind, **params) for a, b in shard_bounds(len(X), n_shards)])
