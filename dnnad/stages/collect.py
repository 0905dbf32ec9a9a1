"""Embeddings brought to the driver (the normal set, the set to rank) and put back as a Ray Dataset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..sources import PASSTHROUGH


@dataclass
class Embedded:
    """Embeddings of a source's readable rows, sorted by (id, vector) for run-to-run determinism."""

    ids: np.ndarray
    X: np.ndarray  # (n, d) float32
    extra: dict  # passthrough columns (group, label, split, n_members; hash, fingerprint when embedded so)
    errors: pa.Table  # id, error of unreadable rows

    def take(self, rows: np.ndarray) -> Embedded:
        return Embedded(self.ids[rows], self.X[rows], {c: v[rows] for c, v in self.extra.items()}, self.errors)


def collect(emb_ds) -> Embedded:
    """Materialise an embedded dataset on the driver: ok rows sorted by (id, vector), error rows apart.
    The driver holds at most two copies of the vectors (the batches as they arrive, then the sorted rows)."""
    ids, embs, bad_ids, errors, extra = [], [], [], [], {}
    for b in emb_ds.iter_batches(batch_size=4096, batch_format="numpy"):
        ok = b["status"] == "ok"
        ids.append(b["id"][ok]), embs.append(b["embedding"][ok])
        bad_ids.append(b["id"][~ok]), errors.append(b["error"][~ok])
        for c in (*PASSTHROUGH, "hash", "fingerprint"):
            if c in b:
                extra.setdefault(c, []).append(b[c][ok])
    ids, extra = np.concatenate(ids).astype(object), {c: np.concatenate(v) for c, v in extra.items()}
    error_rows = pa.table({"id": pa.array(np.concatenate(bad_ids).tolist(), pa.string()),
                           "error": pa.array(np.concatenate(errors).tolist(), pa.string())})
    order = sort_order(ids, embs)
    return Embedded(ids[order], take_rows(embs, order), {c: v[order] for c, v in extra.items()}, error_rows)


def sort_order(ids: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """Positions that sort the stacked rows by id, then (equal ids only) by vector bytes: the same order on
    every run, whatever order the rows arrived in."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if len(s) > 1 and bool((s[1:] == s[:-1]).any()):  # only when the unique-id check is off
        X = np.concatenate(blocks)
        order = np.array(sorted(order, key=lambda i: (ids[i], X[i].tobytes())), dtype=np.int64)
    return order


def take_rows(blocks: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Rows ``order`` of the blocks stacked, as one C-contiguous float32 (n, d) array, without stacking them
    first. ``blocks`` is emptied as it is read, so each block is freed once its rows are placed."""
    d = blocks[0].shape[1] if blocks else 0
    X = np.empty((len(order), d), np.float32)
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))  # the sorted position of each stacked row
    start = 0
    while blocks:
        b = blocks.pop(0)
        X[where[start:start + len(b)]] = b
        start += len(b)
    return X


def as_dataset(ids: np.ndarray, X: np.ndarray, blocks: int, extra: dict | None = None):
    """In-memory embeddings as a Ray Dataset of ok rows; ``_pos`` is each row's position in ``X``
    (the reference position when ``X`` is the indexed set, used for self-exclusion)."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(ids)
    table = pa.table({
        "id": pa.array(ids.tolist(), pa.string()), "embedding": ArrowTensorArray.from_numpy(X),
        "status": pa.array(["ok"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
        "_pos": pa.array(np.arange(n)),
        **{c: pa.array(np.asarray(v).tolist()) for c, v in (extra or {}).items()},
    })
    step = max(1, -(-n // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])


def group_mean(ids: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Mean embedding of a group's members, summed in id order in float64: the same bits wherever it runs."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    return X[order].astype(np.float64).mean(axis=0).astype(np.float32)


def pool_groups(emb: Embedded) -> Embedded:
    """Group anomaly detection on collected embeddings: one mean embedding per group key, with its size."""
    keys = emb.extra["group"].astype(str)
    uniq, inv = np.unique(keys, return_inverse=True)
    X = np.stack([group_mean(emb.ids[inv == g], emb.X[inv == g]) for g in range(len(uniq))])
    counts = np.bincount(inv, minlength=len(uniq))
    return Embedded(uniq.astype(object), X, {"n_members": counts}, emb.errors)


def pool_group_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``map_groups`` function: the rows of one group → one row (its mean embedding over readable members;
    an error row when none is readable)."""
    ok = batch["status"] == "ok"
    d = batch["embedding"].shape[1]
    emb = group_mean(batch["id"][ok], batch["embedding"][ok]) if ok.any() else np.full(d, np.nan, np.float32)
    return {"id": np.array([str(batch["group"][0])], dtype=object), "embedding": emb[None, :],
            "status": np.array(["ok" if ok.any() else "error"], dtype=object),
            "error": np.array([None if ok.any() else "no readable image in the group"], dtype=object),
            "n_members": np.array([int(ok.sum())])}


def pool_groups_dataset(ds):
    """Group anomaly detection on a stream: a Ray Data groupby, nothing collected on the driver."""
    return ds.groupby("group").map_groups(pool_group_rows, batch_format="numpy")
