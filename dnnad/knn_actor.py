"""Ray Data ``map_batches`` callable that scores embedding batches against the broadcast index."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .index import ShardedIndex
from .scoring import score_against, self_exclusions

PASSTHROUGH = ("group", "label", "split", "n_members", "_pos")


def output_schema(extra: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()), ("score", pa.float64()), ("is_anomaly", pa.bool_()),
        ("neighbor_ids", pa.list_(pa.string())), ("neighbor_dists", pa.list_(pa.float64())),
        ("status", pa.string()), ("error", pa.string()), *extra,
    ])


class KnnScorer:
    """Scoring actor. ``shards``/``normal_ids`` are ObjectRefs: every actor maps the one shared copy.

    ``exclude``: None (query set is not the reference set), "self" (leave-one-out: rows carry
    their reference position in ``_pos``) or "duplicates" (also skip exact duplicates).
    """

    def __init__(self, shards, normal_ids, k: int, threshold: float | None, exclude: str | None = None,
                 duplicate_groups=None, threads: int | None = None):
        import faiss
        import ray

        if threads:
            faiss.omp_set_num_threads(threads)
        get = lambda r: ray.get(r) if isinstance(r, ray.ObjectRef) else r  # noqa: E731
        shard_list = get(shards)
        self.index = ShardedIndex([get(s) for s in shard_list])
        self.normal_ids = np.asarray(get(normal_ids), dtype=object)
        self.k = k
        self.threshold = threshold
        self.exclude = exclude
        self.groups = get(duplicate_groups) if exclude == "duplicates" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        ok = np.flatnonzero(batch["status"] == "ok")
        score = np.full(n, np.nan)
        nid: list = [[] for _ in range(n)]
        ndist: list = [[] for _ in range(n)]
        if len(ok):
            excl = self_exclusions(batch["_pos"][ok], self.groups) if self.exclude else None
            s, dist, pos = score_against(self.index, batch["embedding"][ok], self.k, exclude=excl)
            score[ok] = s
            for j, i in enumerate(ok):
                nid[i] = self.normal_ids[pos[j]].tolist()
                ndist[i] = dist[j].tolist()
        has = batch["status"] == "ok"
        flag = [bool(v > self.threshold) if h and self.threshold is not None else None for v, h in zip(score, has)]
        extra = [c for c in PASSTHROUGH if c in batch]
        cols = {
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "score": pa.array(score, pa.float64(), mask=~has),
            "is_anomaly": pa.array(flag, pa.bool_()),
            "neighbor_ids": pa.array(nid, pa.list_(pa.string())),
            "neighbor_dists": pa.array(ndist, pa.list_(pa.float64())),
            "status": pa.array(batch["status"].tolist(), pa.string()),
            "error": pa.array([e if isinstance(e, str) else None for e in batch["error"]], pa.string()),
        }
        for c in extra:
            cols[c] = pa.array(batch[c].tolist())
        return pa.table(cols)
