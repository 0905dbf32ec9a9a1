"""Embeddings brought to the driver (the normal set, the set to rank) and put back as a Ray Dataset."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..core.arrays import take_rows
from ..sources import PASSTHROUGH


@dataclass
class Embedded:
    """Embeddings of a source's readable rows, sorted by (id, vector) for run-to-run determinism. ``X`` and a
    ``fingerprint`` (n, bytes) extra are disk arrays (``core.arrays``): the driver's memory holds the ids and
    the small columns, not the vectors."""

    ids: np.ndarray
    X: np.ndarray  # (n, d) float32
    extra: dict  # passthrough columns (group, label, split, n_members; hash, fingerprint when embedded so)
    errors: pa.Table  # id, error of unreadable rows

    def take(self, rows: np.ndarray) -> Embedded:
        return Embedded(self.ids[rows], take_rows(self.X, rows), {c: take_rows(v, rows) for c, v in self.extra.items()},
                        self.errors)


def collect(emb_ds) -> Embedded:
    """Materialise an embedded dataset on the driver: ok rows sorted by (id, vector), error rows apart. The
    vectors (and fingerprints) stream into a temporary file as they arrive, then into a disk array in sorted
    order, a chunk at a time: the driver's memory holds one batch of them."""
    ids, bad_ids, errors, extra = [], [], [], {}
    with tempfile.TemporaryFile(prefix="dnnad-rows-") as vec_file, tempfile.TemporaryFile(prefix="dnnad-rows-") as fp_file:
        d, width = 0, 0
        for b in emb_ds.iter_batches(batch_size=4096, batch_format="numpy"):
            ok = b["status"] == "ok"
            ids.append(b["id"][ok])
            bad_ids.append(b["id"][~ok]), errors.append(b["error"][~ok])
            if ok.any():
                E = np.ascontiguousarray(b["embedding"][ok], dtype=np.float32)
                d = same_width(d, E.shape[1], "embedding")
                vec_file.write(E.data)
            if "fingerprint" in b and ok.any():
                prints = b["fingerprint"][ok]
                for p in prints:
                    width = same_width(width, len(p), "fingerprint")
                fp_file.write(b"".join(prints))
            for c in (*PASSTHROUGH, "hash"):
                if c in b:
                    extra.setdefault(c, []).append(b[c][ok])
        ids = np.concatenate(ids).astype(object)
        arrived = file_rows(vec_file, (len(ids), d), np.float32)
        order = sort_order(ids, arrived)
        X = take_rows(arrived, order)
        extra = {c: np.concatenate(v)[order] for c, v in extra.items()}
        if width:
            extra["fingerprint"] = take_rows(file_rows(fp_file, (len(ids), width), np.uint8), order)
    error_rows = pa.table({"id": pa.array(np.concatenate(bad_ids).tolist(), pa.string()),
                           "error": pa.array(np.concatenate(errors).tolist(), pa.string())})
    return Embedded(ids[order], X, extra, error_rows)


def same_width(seen: int, width: int, what: str) -> int:
    """``width``, checked against the width of the rows ``seen`` so far (0: none yet)."""
    if seen and width != seen:
        raise ValueError(f"rows of one set have {what}s of {seen} and of {width} values")
    return width


def file_rows(f, shape: tuple[int, int], dtype) -> np.ndarray:
    """The rows written to the open temporary file ``f``, as a disk array (a mapping of the file)."""
    f.flush()
    assert f.tell() == shape[0] * shape[1] * np.dtype(dtype).itemsize, "rows written do not match their shape"
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(f, dtype=dtype, mode="r", shape=shape)


def sort_order(ids: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Positions that sort the rows by id, then (equal ids only) by vector bytes: the same order on every run,
    whatever order the rows arrived in."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if len(s) > 1 and bool((s[1:] == s[:-1]).any()):  # only when the unique-id check is off
        order = np.array(sorted(order, key=lambda i: (ids[i], X[i].tobytes())), dtype=np.int64)
    return order


def as_dataset(ids: np.ndarray, X: np.ndarray, blocks: int, extra: dict | None = None):
    """In-memory embeddings as a Ray Dataset of ok rows; ``_pos`` is each row's position in ``X``
    (the reference position when ``X`` is the indexed set, used for self-exclusion)."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(ids)
    step = max(1, -(-n // blocks))

    def block(a: int, b: int) -> pa.Table:
        m = b - a
        return pa.table({
            "id": pa.array(ids[a:b].tolist(), pa.string()), "embedding": ArrowTensorArray.from_numpy(np.asarray(X[a:b])),
            "status": pa.array(["ok"] * m, pa.string()), "error": pa.nulls(m, pa.string()),
            "_pos": pa.array(np.arange(a, b)),
            **{c: pa.array(np.asarray(v[a:b]).tolist()) for c, v in (extra or {}).items()},
        })

    # one block at a time into the object store: the driver never holds a second copy of ``X``
    return ray.data.from_arrow_refs([ray.put(block(a, min(n, a + step))) for a in range(0, max(n, 1), step)])


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
