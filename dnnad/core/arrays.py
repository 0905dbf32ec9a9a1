"""Array checks, the one L2 normaliser and disk-backed row arrays: numpy only, so the embedding side loads no
faiss.

A job's driver keeps the rows it collects (embeddings, fingerprints) in *disk arrays*: ``np.memmap`` over an
unlinked temporary file. Their pages are the kernel's page cache, written back and dropped under memory
pressure, not the process's heap, so a million 1280-d rows (5 GB) need disk there, not memory; the file is
gone when the array is. Everything derived from a disk array row by row (a transform, a subset) is made on
disk too, in chunks of ``ROW_CHUNK`` rows; arrays in memory stay in memory.
"""
from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

ROW_CHUNK = 16384  # rows per step when a whole array is read or derived chunk by chunk


def disk_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array of ``shape`` backed by an unlinked temporary file (in ``TMPDIR``); an empty shape is an
    ordinary empty array (nothing can map zero bytes)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    with tempfile.TemporaryFile(prefix="dnnad-rows-") as f:
        reserve(f, nbytes)
        return np.memmap(f, dtype=dtype, mode="r+", shape=shape)  # the mapping keeps the file alive


def reserve(f, nbytes: int) -> None:
    """Give the open file ``f`` ``nbytes`` of disk now, so that a full disk is an OSError here and not a SIGBUS
    when a mapped page is first written (a sparse file where the system cannot reserve)."""
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
        return
    except AttributeError:  # no posix_fallocate (macOS)
        pass
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(e.errno, f"no room for {nbytes / 2**30:.2f} GiB of collected rows in "
                                   f"{tempfile.gettempdir()} (set TMPDIR to a larger disk): {e.strerror}") from None
    f.truncate(nbytes)


def on_disk(X: np.ndarray) -> bool:
    """Whether ``X`` is (a view of) a disk array; copies of one are in memory."""
    return getattr(X, "_mmap", None) is not None


def map_rows(X: np.ndarray, f, width: int, dtype) -> np.ndarray:
    """``f`` applied to ``X`` (n, d) ``ROW_CHUNK`` rows at a time, into an (n, ``width``) array of ``dtype``: on
    disk when ``X`` is, in memory otherwise."""
    out = disk_array((len(X), width), dtype) if on_disk(X) else np.empty((len(X), width), dtype)
    for s in range(0, len(X), ROW_CHUNK):
        out[s:s + ROW_CHUNK] = f(X[s:s + ROW_CHUNK])
    return out


def take_rows(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``X[rows]``, on disk (filled chunk by chunk) when ``X`` is."""
    if not on_disk(X):
        return X[rows]
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if len(rows) != len(X):
            raise IndexError(f"boolean index of {len(rows)} for {len(X)} rows")
        rows = np.flatnonzero(rows)
    out = disk_array((len(rows), *X.shape[1:]), X.dtype)
    for s in range(0, len(rows), ROW_CHUNK):
        out[s:s + ROW_CHUNK] = X[rows[s:s + ROW_CHUNK]]
    return out


def as_float32(X: np.ndarray) -> np.ndarray:
    """(n, d) C-contiguous float32 view or copy of ``X`` (a disk array stays on disk); rejects NaN/inf."""
    if not on_disk(X):
        X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array of shape (n, d), got shape {X.shape}")
    if X.dtype != np.float32 or not X.flags.c_contiguous:  # a disk array: its float32 copy on disk
        X = map_rows(X, lambda rows: rows, X.shape[1], np.float32)
    if not all(np.isfinite(X[s:s + ROW_CHUNK]).all() for s in range(0, len(X), ROW_CHUNK)):
        raise ValueError("embeddings contain NaN or inf")
    return X


def l2_normalize(X: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows of ``X`` (n, d) scaled to unit Euclidean norm, as ``dtype``; all-zero rows stay zero."""
    X = np.asarray(X, dtype=dtype)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), dtype(1e-12))


def first_identical(X: np.ndarray) -> np.ndarray:
    """Position of the first row equal to each row of ``X`` (n, d), shape (n,) int64: ``i`` for a row with no
    earlier copy. Rows are bucketed by a 64-bit integer hash of their bit patterns, ``ROW_CHUNK`` rows at a time,
    and each row is then compared with its bucket's first row, so a hash collision cannot join two different
    rows (a row that collides keeps a group of its own)."""
    n = len(X)
    if n == 0:
        return np.zeros(0, np.int64)
    bits = np.dtype(f"u{X.dtype.itemsize}")
    w = np.random.default_rng(0x5EED).integers(1, 2 ** 63, size=X.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, np.uint64)
    for s in range(0, n, ROW_CHUNK):
        u = np.ascontiguousarray(X[s:s + ROW_CHUNK]).view(bits).astype(np.uint64)
        h[s:s + len(u)] = u @ w  # wraps modulo 2**64: exact integer arithmetic, equal rows hash equal
    _, first_of_bucket, bucket = np.unique(h, return_index=True, return_inverse=True)
    first = first_of_bucket[bucket].astype(np.int64)
    for s in np.unique(np.flatnonzero(first != np.arange(n)) // ROW_CHUNK) * ROW_CHUNK:
        rows = np.arange(s, min(n, s + ROW_CHUNK))
        rows = rows[first[rows] != rows]
        differ = (np.asarray(X[rows]) != np.asarray(X[first[rows]])).any(axis=1)
        first[rows[differ]] = rows[differ]
    return first
