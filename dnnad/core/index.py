"""Sharded exact/approximate kNN index over float32 vectors, with a deterministic exact refine.

A shard holds a contiguous slice of the reference set: its vectors (a float32 array, which Ray shares
read-only between actors, or a memory-mapped .npy file read on demand) and, for approximate kinds, a
serialized FAISS index over them. A search asks every shard for float32 candidates (each shard with
all FAISS threads), merges them and re-ranks in float64 only the candidates whose float32 distance
is within a proven rounding bound of the k-th; ties are broken by position. A query whose candidate
list cannot prove the answer (ties beyond the over-fetch) is searched again with more candidates, so flat
results are those of exact brute force, whatever the shard layout.

Identical rows of a flat shard are searched once: FAISS sees one row per distinct vector and each candidate
stands for its copies, in position order. Without this, a query among N identical rows (blank frames, a
backbone's all-zero vectors) could only settle its ties by position after fetching all N of them: N^2
candidates over a set's queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .arrays import as_float32, first_identical
from .settings import COMPRESSED_KINDS, INDEX_KINDS

EXACT_KINDS = ("flat",)
COMPRESSED_OVERFETCH = 8  # compressed kinds re-rank 8x the candidates: code distances are coarse
UNIT_ROUNDOFF = 2.0 ** -24  # float32
RERANK_ROWS = 1 << 16  # query-candidate pairs re-ranked at a time (bounds the float64 temporaries)
QUERY_CANDIDATES = 1 << 22  # query-candidate pairs (copies counted) in one round's arrays, at most
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger re-searches run on the CPU


@dataclass(frozen=True)
class Shard:
    """One slice of the reference set: rows ``offset .. offset + len(vectors)``."""

    offset: int
    vectors: np.ndarray  # (n, d) float32, C-contiguous (or a read-only memmap of a shard .npy file)
    faiss_bytes: np.ndarray | None = None  # serialized approximate index, uint8

    @property
    def memory_bytes(self) -> int:
        """Bytes a search process holds for this shard: the vectors, or only the codes where the vectors are
        memory-mapped and read on demand."""
        codes = 0 if self.faiss_bytes is None else int(self.faiss_bytes.nbytes)
        return codes + (0 if isinstance(self.vectors, np.memmap) and codes else int(self.vectors.nbytes))

    def by_value(self) -> Shard:
        """This shard as one that travels with its rows: for processes that cannot open its memory-mapped file
        (another host). The rows are read from the file only while being serialized."""
        if not isinstance(self.vectors, np.memmap):
            return self
        return Shard(self.offset, self.vectors.view(np.ndarray), self.faiss_bytes)

    def __reduce__(self):
        """A shard memory-mapped from a whole .npy file travels (to Ray actors) as its path, not its rows."""
        path = getattr(self.vectors, "filename", None)
        if isinstance(self.vectors, np.memmap) and path and np.load(path, mmap_mode="r").shape == self.vectors.shape:
            return mapped_shard, (self.offset, str(path), self.faiss_bytes)
        return Shard, (self.offset, self.vectors, self.faiss_bytes)


def mapped_shard(offset: int, path: str, faiss_bytes: np.ndarray | None = None) -> Shard:
    """A shard whose vectors stay on disk (a float32 .npy file) and are read on demand by the exact re-rank."""
    return Shard(offset, np.load(path, mmap_mode="r", allow_pickle=False), faiss_bytes)


@dataclass(frozen=True)
class Exclusion:
    """Reference rows a query may not use: row j for query i where ``ref_labels[j] == query_labels[i]``.

    ``ref_labels`` None means labels are positions (query i excludes row ``query_labels[i]``).
    ``max_rows`` is the most rows any one query excludes; ``max_distinct``, when known, the most distinct
    vectors among them (1 where labels group identical rows): how far candidates are over-fetched.
    """

    query_labels: np.ndarray  # (nq,) int64
    ref_labels: np.ndarray | None = None  # (ntotal,) int64
    max_rows: int = 1
    max_distinct: int | None = None

    def take(self, rows: np.ndarray) -> Exclusion:
        return Exclusion(self.query_labels[rows], self.ref_labels, self.max_rows, self.max_distinct)

    def excluded(self, I: np.ndarray) -> np.ndarray:
        """Boolean mask of the candidates ``I`` (nq, c), all valid positions, that are excluded."""
        labels = I if self.ref_labels is None else self.ref_labels[I]
        return labels == self.query_labels[:, None]


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) bounds splitting ``n`` rows into at most ``n_shards`` non-empty parts."""
    n_shards = max(1, min(int(n_shards), n))
    edges = np.linspace(0, n, n_shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def pq_subquantizers(d: int) -> int:
    """IVF-PQ sub-quantizers: one byte per 8 dimensions (d/8 bytes a vector), a divisor of d."""
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return m


def build_shard(vectors: np.ndarray, offset: int, kind: str = "flat", nlist: int = 0, hnsw_m: int = 32) -> Shard:
    """Build one shard; ``kind`` is flat (exact), ivf (IVF-Flat), hnsw (HNSW-Flat), ivfpq (IVF-PQ codes,
    d/8 bytes a vector) or sq8 (8-bit scalar-quantized codes, d bytes a vector)."""
    X = as_float32(vectors)
    if kind == "flat":
        return Shard(offset, X)
    d = X.shape[1]
    if kind in ("ivf", "ivfpq"):
        nlist = nlist or max(1, int(4 * np.sqrt(len(X))))
        nlist = min(nlist, len(X) if kind == "ivf" else max(1, len(X) // 39))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            nbits = 8 if len(X) >= 256 * 39 else max(1, int(np.log2(max(2, len(X) // 39))))
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_subquantizers(d), nbits)
            index.pq.cp.seed = 1234
        index.cp.seed = 1234
        index.train(X)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
    elif kind == "sq8":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit)
        index.train(X)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    index.add(X)
    return Shard(offset, X, faiss.serialize_index(index))


def index_kind(index) -> str:
    """The INDEX_KINDS name of a deserialized FAISS index, or flat for None."""
    if index is None:
        return "flat"
    for cls, kind in ((faiss.IndexHNSW, "hnsw"), (faiss.IndexIVFPQ, "ivfpq"), (faiss.IndexIVFFlat, "ivf"),
                      (faiss.IndexScalarQuantizer, "sq8")):
        if isinstance(index, cls):
            return kind
    raise ValueError(f"unsupported FAISS index {type(index).__name__}")


class ShardedIndex:
    """kNN over a list of contiguous shards: the whole reference set (rows ``0 .. ntotal``), or a shard group
    (a slice of it; positions stay those of the whole set, see ``merge_neighbours``).

    ``exact=False`` (compressed kinds only) scores neighbours by the codes' distances instead of
    re-ranking them from the vectors, so the vectors are never read. ``device="cuda"`` searches with FAISS
    on the GPU (flat: ``faiss.knn_gpu``; IVF kinds: the index moved to the GPU; HNSW stays on the CPU),
    with the same exact re-rank on the CPU.
    """

    def __init__(self, shards: list[Shard], nprobe: int = 16, ef_search: int = 64, exact: bool = True,
                 device: str = "cpu"):
        if not shards:
            raise ValueError("an index needs at least one shard")
        self.shards = sorted(shards, key=lambda s: s.offset)
        self.d = int(self.shards[0].vectors.shape[1])
        self.offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        self.ntotal = int(sum(len(s.vectors) for s in self.shards))
        expected = int(self.shards[0].offset)
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
        self.kind = index_kind(self._approx[0])
        self._group_identical_rows()
        self._gpu = None
        if device.startswith("cuda"):
            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("device cuda needs faiss with GPU support (pip install dnnad[gpu])")
            self._gpu = faiss.StandardGpuResources()
            self._approx = [faiss.index_cpu_to_gpu(self._gpu, 0, a) if a is not None and not hasattr(a, "hnsw")
                            else a for a in self._approx]
        self.exact = exact or self.kind not in COMPRESSED_KINDS
        # Squared norms bound the float32 rounding error of FAISS's distances (exact kinds only).
        self._sqnorms = (np.concatenate([np.einsum("ij,ij->i", s.vectors, s.vectors, dtype=np.float64)
                                         for s in self.shards]) if self.kind in EXACT_KINDS else np.zeros(0))
        self._max_sqnorm = float(self._sqnorms.max(initial=0.0))

    def _group_identical_rows(self) -> None:
        """What FAISS searches per shard (``_searched``: the rows, or one row per distinct vector of a flat shard,
        whose positions are ``_first``) and, over all shards, each group of identical rows: its first position
        ``_group_first``, its positions ``_group_rows[_group_ptr[g]:_group_ptr[g + 1]]`` in order."""
        self._searched, self._first = [], []
        firsts, ptrs, rows = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for s, approx in zip(self.shards, self._approx):
            first = first_identical(s.vectors) if approx is None else np.arange(len(s.vectors))
            unique = np.flatnonzero(first == np.arange(len(first)))
            if approx is not None or len(unique) == len(first):
                self._searched.append(s.vectors)
                self._first.append(None)
                continue
            self._searched.append(np.ascontiguousarray(s.vectors[unique]))
            self._first.append(unique)
            order = np.argsort(first, kind="stable")  # by group, positions in order within each
            g = first[order]
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            sizes = np.diff(np.r_[starts, len(g)])
            multi = sizes > 1
            firsts.append(g[starts[multi]] + s.offset)
            ptrs.append(sizes[multi])
            rows.append(order[np.repeat(multi, sizes)] + s.offset)
        self._group_first = np.concatenate(firsts)
        self._group_ptr = np.concatenate([[0], np.cumsum(np.concatenate(ptrs))]).astype(np.int64)
        self._group_rows = np.concatenate(rows)
        self.max_copies = int(np.diff(self._group_ptr).max(initial=1))  # rows in the largest group

    def _copies(self, R: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``w`` positions (R.shape + (w,), -1 past a group's end) of the groups whose first positions
        are ``R`` (-1: none), and each group's size (R.shape)."""
        g = np.clip(np.searchsorted(self._group_first, R), 0, max(len(self._group_first) - 1, 0))
        grouped = (R >= 0) & (self._group_first[g] == R) if len(self._group_first) else np.zeros(R.shape, bool)
        size = np.where(grouped, self._group_ptr[g + 1] - self._group_ptr[g], (R >= 0).astype(np.int64))
        t = np.arange(w)
        at = np.minimum(self._group_ptr[g][..., None] + t, len(self._group_rows) - 1)
        P = np.where(grouped[..., None] & (t < size[..., None]), self._group_rows[at], -1)
        P[..., 0] = np.where(grouped, P[..., 0], R)
        return P, size

    def _uniform(self, first: int, labels: np.ndarray) -> bool:
        """Whether every row of the group starting at position ``first`` has one label."""
        g = int(np.searchsorted(self._group_first, first))
        lab = labels[self._group_rows[self._group_ptr[g]:self._group_ptr[g + 1]]]
        return bool((lab == lab[0]).all())

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (1-d int64 positions, all valid) as float32, shape (len(idx), d); memory-mapped
        shards read only these rows."""
        out = np.empty((len(idx), self.d), dtype=np.float32)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for j in np.unique(shard):
            m = shard == j
            s = self.shards[j]
            out[m] = s.vectors[idx[m] - s.offset]
        return out

    def candidates(self, Xq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float32 squared distances and positions (nq, n_shards * kk) of up to ``kk`` nearest rows of every
        shard (inf / -1 for none), and a bound (nq,): every row not returned is at least this far (float32).
        A shard's identical rows count once: the position returned is their group's first."""
        F, I = [], []
        bound = np.full(len(Xq), np.inf, dtype=np.float32)
        for s, approx, X, first in zip(self.shards, self._approx, self._searched, self._first):
            kk_s = min(kk, len(X))
            if approx is not None:
                D_s, I_s = approx.search(Xq, kk_s)
            elif self._gpu is not None and kk_s <= GPU_MAX_K:
                D_s, I_s = faiss.knn_gpu(self._gpu, Xq, np.ascontiguousarray(X), kk_s)
            else:
                D_s, I_s = faiss.knn(Xq, X, kk_s)
            if kk_s < len(X):
                np.minimum(bound, D_s[:, -1], out=bound)
            if first is not None:
                I_s = np.where(I_s >= 0, first[np.maximum(I_s, 0)], -1)
            F.append(np.where(I_s >= 0, D_s, np.inf))
            I.append(np.where(I_s >= 0, I_s + s.offset, -1))
        return np.concatenate(F, axis=1), np.concatenate(I, axis=1), bound

    def search(self, Xq: np.ndarray, k: int, exclude: Exclusion | None = None,
               margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Distances (nq, k) float64 and positions (nq, k) int64 of the k nearest rows, nearest first, ties
        by position; exact Euclidean for every kind unless ``exact`` is off.

        ``exclude`` names rows a query may not use as neighbours (itself, its duplicates). Candidates are
        over-fetched by ``margin``; queries the float32 candidates cannot settle are searched again with 4x
        (and with 4x the copies of each group of identical rows).
        """
        Xq = as_float32(Xq)
        if Xq.shape[1] != self.d:
            raise ValueError(f"query dimension {Xq.shape[1]} does not match index dimension {self.d}")
        n_excl = exclude.max_rows if exclude is not None else 0
        if k < 1 or k + n_excl > self.ntotal:
            raise ValueError(f"k={k} needs at least {k + n_excl} reference rows, index has {self.ntotal}")
        nq = len(Xq)
        D, I = np.full((nq, k), np.nan), np.full((nq, k), -1, dtype=np.int64)
        todo = np.arange(nq)
        # Each shard returns its best ``depth`` rows beyond the excluded ones; approximate kinds then re-rank
        # only the best ``cap`` valid candidates by the index's own distance (the breadth of a query without
        # exclusions), however many rows the exclusions over-fetch.
        depth = (k + margin) * (COMPRESSED_OVERFETCH if self.exact and self.kind in COMPRESSED_KINDS else 1)
        if exclude is not None and exclude.max_distinct is not None and self.kind in EXACT_KINDS:
            n_excl = min(n_excl, exclude.max_distinct)  # a flat shard's excluded copies of one vector: one candidate
        kk, cap = min(self.ntotal, depth + n_excl), depth * len(self.shards)
        copies = min(self.max_copies, k + 1)  # k usable copies of a group even when the query is one of them
        uniform: dict[int, bool] = {}
        while len(todo):
            chunk = max(1, QUERY_CANDIDATES // (kk * len(self.shards) * copies))
            more_rows = more_copies = False
            for a in range(0, len(todo), chunk):
                rows = todo[a:a + chunk]
                ex = exclude.take(rows) if exclude is not None else None
                if self.max_copies > 1:
                    D_t, I_t, done, short = self._refine_copies(Xq[rows], k, kk, ex, copies, uniform)
                else:
                    D_t, I_t, done = self._refine(Xq[rows], k, kk, ex, cap if kk < self.ntotal else None)
                    short = np.zeros(len(rows), bool)
                D[rows[done]], I[rows[done]] = D_t[done], I_t[done]
                more_copies |= bool(short.any())
                more_rows |= bool((~done & ~short).any())
            todo = todo[np.isnan(D[todo, 0])] if len(todo) else todo
            if len(todo) and kk == self.ntotal and (copies == self.max_copies or not more_copies):
                raise RuntimeError("index returned fewer than k neighbours; increase nprobe/ef_search")
            if more_rows or not more_copies:
                kk, cap = min(self.ntotal, 4 * kk), 4 * cap
            if more_copies:
                copies = min(self.max_copies, 4 * copies)
        return D, I

    def _distances(self, Xq: np.ndarray, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 distances (m,) between queries ``Xq[q]`` and reference rows ``rows``, in slices
        that bound the float64 temporaries to ``RERANK_ROWS`` x d."""
        out = np.empty(len(q))
        for a in range(0, len(q), RERANK_ROWS):
            diff = np.subtract(self.vectors(rows[a:a + RERANK_ROWS]), Xq[q[a:a + RERANK_ROWS]], dtype=np.float64)
            out[a:a + RERANK_ROWS] = np.sqrt(np.einsum("md,md->m", diff, diff))
        return out

    def _bounds(self, Xq: np.ndarray, F: np.ndarray, R: np.ndarray, valid: np.ndarray, bound: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which queries the float32 candidates settle (nq,), which candidates could lie within the k nearest by
        exact Euclidean distance (F.shape, whatever rows they stand for are usable), and which of those contend
        (stand for a usable row). ``F``/``R``: float32 squared distances and positions (nq, c); ``valid``
        (nq, c, m): the usable rows each candidate stands for; ``bound``: every row not among the candidates is at
        least this far (float32).

        FAISS's float32 squared distance of a query q and a row x is within (2d + 16) u (|q|^2 + |x|^2) of the
        exact one (u the float32 unit roundoff: dot products and norms of d terms, worst case). ``U``, the k-th
        smallest upper bound over the usable rows, bounds the k-th exact distance; candidates whose lower bound
        exceeds it cannot be among the k. A row not returned is farther than ``U`` when its lower bound is, or
        when |x| > |q| + sqrt(U): the per-row error is bounded by the norms of those rows only, not the largest
        norm of the set (a query near zero among many small rows settles on a few candidates)."""
        c = (2 * self.d + 16) * UNIT_ROUNDOFF
        qn = np.einsum("ij,ij->i", Xq, Xq, dtype=np.float64)
        err = c * (qn[:, None] + self._sqnorms[np.maximum(R - self.offsets[0], 0)])  # a shard group's rows start there
        high = np.where(valid, (F + err)[..., None], np.inf).reshape(len(F), -1)
        U = np.partition(high, k - 1, axis=1)[:, k - 1]
        small = np.minimum((np.sqrt(qn) + np.sqrt(U)) ** 2 * (1 + 1e-9), self._max_sqnorm)  # rows beyond: farther
        settled = np.isfinite(U) & (bound.astype(np.float64) - c * (qn + small) > U)
        near = F - err <= U[:, None]
        return settled, near, valid.any(axis=2) & near

    def _refine_copies(self, Xq: np.ndarray, k: int, kk: int, exclude: Exclusion | None, copies: int,
                       uniform: dict[int, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``_refine`` for a flat index holding identical rows: each candidate group is re-ranked once and
        stands for its first ``copies`` positions. A group cut short whose uncut rows could still be among the k
        (some of its rows excluded, the rest not known to be) leaves its query unsettled and short of copies
        (the fourth array). ``uniform`` caches, per group's first position, whether the group has one label."""
        F, R, bound = self.candidates(Xq, kk)
        nq, c = F.shape
        P, size = self._copies(R, copies)  # (nq, c, copies), (nq, c)
        valid = P >= 0
        if exclude is not None:
            valid &= ~exclude.excluded(np.maximum(P, 0).reshape(nq, -1)).reshape(P.shape)
        settled, near, contend = self._bounds(Xq, F, R, valid, bound, k)
        q, col = np.nonzero(contend)
        E_c = np.full(F.shape, np.inf)
        E_c[q, col] = self._distances(Xq, q, R[q, col])
        E = np.where(valid, E_c[..., None], np.inf).reshape(nq, -1)
        pos = np.maximum(P, 0).reshape(nq, -1)
        order = np.lexsort((pos, E), axis=1)[:, :k]
        E, pos = np.take_along_axis(E, order, 1), np.take_along_axis(pos, order, 1)
        # a group cut short with fewer than k usable rows among its first ``copies`` may hide usable copies within
        # reach (labels that split a group): ``near``, not the exact distance, which is not measured for a group
        # whose first rows are all excluded
        cut = (size > copies) & (valid.sum(axis=2) < k) & near
        for first in np.unique(R[cut]) if exclude is not None and exclude.ref_labels is not None else ():
            if uniform.setdefault(int(first), self._uniform(int(first), exclude.ref_labels)):
                cut &= R != first  # its uncut rows are excluded exactly when its cut ones are
        short = cut.any(axis=1)
        return E, pos.astype(np.int64), settled & np.isfinite(E).all(axis=1) & ~short, short

    def _refine(self, Xq: np.ndarray, k: int, kk: int, exclude: Exclusion | None, cap: int | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, positions, settled) of one candidate round; unsettled rows hold garbage. ``cap``: how
        many valid candidates an approximate kind re-ranks (None: all)."""
        F, I, bound = self.candidates(Xq, kk)
        valid = I >= 0
        safe = np.where(valid, I, 0)
        if exclude is not None:
            valid &= ~exclude.excluded(safe)
        F = np.where(valid, F, np.inf)
        if self.kind not in EXACT_KINDS and cap is not None and cap < F.shape[1]:
            best = np.lexsort((safe, F), axis=1)[:, :cap]  # ties at the cap by position
            F, safe, valid = (np.take_along_axis(a, best, 1) for a in (F, safe, valid))
        if self.kind in EXACT_KINDS:
            settled, _, contend = self._bounds(Xq, F, safe, valid[..., None], bound, k)
        else:
            settled = np.isfinite(np.partition(F, k - 1, axis=1)[:, k - 1])
            contend = valid
        if self.exact:
            q, c = np.nonzero(contend)
            E = np.full(F.shape, np.inf)
            E[q, c] = self._distances(Xq, q, safe[q, c])
        else:
            E = np.sqrt(np.where(valid, F, np.inf).astype(np.float64))
        # Order by (distance, position); an approximate index may repeat a row: keep its first copy.
        order = np.lexsort((safe, E), axis=1)
        E, safe = np.take_along_axis(E, order, 1), np.take_along_axis(safe, order, 1)
        if self.kind not in EXACT_KINDS:
            dup = np.zeros(E.shape, dtype=bool)
            dup[:, 1:] = (safe[:, 1:] == safe[:, :-1]) & np.isfinite(E[:, 1:])
            E[dup] = np.inf
            order = np.lexsort((safe, E), axis=1)
            E, safe = np.take_along_axis(E, order, 1), np.take_along_axis(safe, order, 1)
        E, safe = E[:, :k], safe[:, :k]
        settled &= np.isfinite(E).all(axis=1)
        return E, safe.astype(np.int64), settled


def build_index(X: np.ndarray, n_shards: int = 1, kind: str = "flat", exact: bool = True, **params) -> ShardedIndex:
    """Build all shards in this process (the Ray pipeline builds them as parallel tasks)."""
    X = as_float32(X)
    return ShardedIndex([build_shard(X[a:b], a, kind, **params) for a, b in shard_bounds(len(X), n_shards)],
                        exact=exact)


def merge_neighbours(D1: np.ndarray, I1: np.ndarray, D2: np.ndarray, I2: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of two exact neighbour lists (nq, k1) and (nq, k2) over disjoint rows, by (distance,
    position): merging the exact top-k of every shard group gives the exact top-k of the whole set (inf / -1
    pad lists that hold fewer rows)."""
    D, I = np.concatenate([D1, D2], axis=1), np.concatenate([I1, I2], axis=1)
    order = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), D), axis=1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def shard_groups(rows: list[int], n_groups: int) -> list[list[int]]:
    """Contiguous groups of shard numbers, at most ``n_groups``, balanced by rows."""
    n_groups = max(1, min(int(n_groups), len(rows)))
    edges = np.searchsorted(np.cumsum(rows), np.linspace(0, sum(rows), n_groups + 1)[1:-1], side="left") + 1
    bounds = [0, *sorted(set(int(e) for e in edges if 0 < e < len(rows))), len(rows)]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
