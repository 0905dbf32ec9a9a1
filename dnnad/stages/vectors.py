"""Embed stage for sources that already hold vectors (``--embedding-column``): rows are checked, not computed.

A row whose vector is null, of the wrong dimension or not finite becomes an error row with its reason.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.extensions import ArrowTensorArray

from ..sources import NULL_ID, PASSTHROUGH
from .read import READ_CPUS


def check_vectors(batch: pa.Table, dim: int) -> pa.Table:
    """(id, vector) rows → (id, embedding, status, error) rows; stateless, so it runs as plain tasks."""
    n = batch.num_rows
    vec = batch["vector"].combine_chunks()
    if isinstance(vec, pa.ChunkedArray):  # an empty table
        vec = pa.array([], pa.list_(pa.float32()))
    lengths = pc.fill_null(pc.list_value_length(vec), -1).to_numpy(zero_copy_only=False)
    ok_len = lengths == dim
    emb = np.full((n, dim), np.nan, dtype=np.float32)
    if ok_len.any():
        good = vec.filter(pa.array(ok_len))
        emb[ok_len] = pc.list_flatten(good).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    finite = np.isfinite(emb).all(axis=1)
    ids = batch["id"]
    null_id = ids.is_null().to_numpy(zero_copy_only=False)
    error = np.where(null_id, NULL_ID, np.where(
        lengths < 0, "null embedding", np.where(
            ~ok_len, np.char.add(np.char.add("embedding has ", lengths.astype(str)), f" values, expected {dim}"),
            np.where(~finite, "embedding has NaN or inf", ""))))
    bad = error != ""
    emb[bad] = np.nan
    out = {"id": ids, "embedding": ArrowTensorArray.from_numpy(emb),
           "status": pa.array(np.where(bad, "error", "ok"), pa.string()),
           "error": pa.array(error.astype(object), pa.string(), mask=~bad)}
    out.update({c: batch[c] for c in PASSTHROUGH if c in batch.column_names})
    return pa.table(out)


def vectors(ds, dim: int):
    """Checked embedding rows of a vector source (lazy); runs as light tasks, not an actor pool."""
    return ds.map_batches(check_vectors, fn_kwargs={"dim": dim}, batch_format="pyarrow", num_cpus=READ_CPUS)
