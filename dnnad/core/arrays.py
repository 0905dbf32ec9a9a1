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
