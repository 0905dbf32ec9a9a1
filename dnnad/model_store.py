"""A fitted model on disk: JSON metadata, ids as Parquet, vectors as .npy, FAISS indexes as .faiss.

No pickle anywhere: ``np.load(allow_pickle=False)`` and FAISS's own binary format cannot run code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .index import Shard

FORMAT_VERSION = 1


@dataclass
class FittedModel:
    """Everything scoring needs: the index shards, normal ids, k, threshold and how embeddings were made."""

    shards: list[Shard]
    ids: np.ndarray  # normal ids, aligned with index positions
    k: int
    threshold: float
    meta: dict = field(default_factory=dict)  # backbone, weights identity, image size, loo stats, reduction
    loo_scores: np.ndarray | None = None


def save_model(model: FittedModel, path: str) -> None:
    """Write atomically: a temporary sibling directory renamed into place."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    try:
        shard_meta = []
        for i, s in enumerate(model.shards):
            np.save(os.path.join(tmp, f"shard-{i:03d}.npy"), s.vectors, allow_pickle=False)
            if s.faiss_bytes is not None:
                s.faiss_bytes.tofile(os.path.join(tmp, f"shard-{i:03d}.faiss"))
            shard_meta.append({"offset": s.offset, "rows": len(s.vectors), "faiss": s.faiss_bytes is not None})
        cols = {"id": pa.array(model.ids.tolist(), pa.string())}
        if model.loo_scores is not None:
            cols["loo_score"] = pa.array(model.loo_scores, pa.float64())
        pq.write_table(pa.table(cols), os.path.join(tmp, "normal.parquet"))
        doc = {"format": "dnnad-model", "version": FORMAT_VERSION, "k": model.k,
               "threshold": model.threshold, "shards": shard_meta, **model.meta}
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_model_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "model.json"))


def load_model(path: str) -> FittedModel:
    with open(os.path.join(path, "model.json")) as f:
        doc = json.load(f)
    if doc.get("format") != "dnnad-model" or doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a dnnad model (format {doc.get('format')} v{doc.get('version')})")
    shards = []
    for i, sm in enumerate(doc.pop("shards")):
        vec = np.load(os.path.join(path, f"shard-{i:03d}.npy"), allow_pickle=False)
        fb = np.fromfile(os.path.join(path, f"shard-{i:03d}.faiss"), dtype=np.uint8) if sm["faiss"] else None
        shards.append(Shard(sm["offset"], vec, fb))
    table = pq.read_table(os.path.join(path, "normal.parquet"))
    loo = table["loo_score"].to_numpy() if "loo_score" in table.column_names else None
    meta = {k: v for k, v in doc.items() if k not in ("format", "version", "k", "threshold")}
    return FittedModel(shards, np.asarray(table["id"].to_pylist(), dtype=object), doc["k"], doc["threshold"],
                       meta, loo)
