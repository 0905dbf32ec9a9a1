"""A fitted model on disk: ``model.json`` (typed metadata with a format version, also the marker that dnnad
wrote the directory), ids as Parquet, vectors as .npy, FAISS indexes as .faiss, calibration scores as .npy.

No pickle anywhere: ``np.load(allow_pickle=False)`` and FAISS's own binary format cannot run code. A model
is validated when loaded, and a directory that is not a dnnad model is never deleted or replaced.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .index import COMPRESSED_KINDS, Shard

FORMAT = "dnnad-model"
FORMAT_VERSION = 2
MODEL_FILE = "model.json"


class ModelError(ValueError):
    """A model directory that cannot be used (missing, damaged, foreign or of another format version)."""


@dataclass(frozen=True)
class ModelMeta:
    """How the reference embeddings were made and how the threshold was set."""

    dim: int
    n_normal: int
    n_reference: int
    k_requested: int
    threshold_quantile: float
    threshold_reliable: bool
    index_kind: str = "flat"
    n_shards: int = 1
    reduction: str | None = None
    backbone: str | None = None  # None for models fitted on embeddings by the library
    image_size: int | None = None
    weights: str | None = None
    weights_identity: str | None = None
    normal_source: dict | None = None  # SourceConfig of the normal set, for report thumbnails
    normal_labels: list | None = None  # label values seen in the normal set, as strings
    loo_score_quantiles: dict = field(default_factory=dict)


@dataclass
class FittedModel:
    """Everything scoring needs: the index shards, reference ids, k, threshold and how embeddings were made."""

    shards: list[Shard]
    ids: np.ndarray  # reference ids, aligned with index positions
    k: int
    threshold: float
    meta: ModelMeta
    calibration_scores: np.ndarray  # (n_normal,) scores the threshold was set from, sorted ascending

    def normal_percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percentage of the normal set's calibration scores strictly below each score (100 = above all)."""
        s = np.asarray(scores, dtype=np.float64)
        return 100.0 * np.searchsorted(self.calibration_scores, s, side="left") / len(self.calibration_scores)


def is_model_dir(path: str | None) -> bool:
    """Whether ``path`` holds a model that dnnad wrote (its ``model.json`` names the format)."""
    if not path or not os.path.isfile(os.path.join(path, MODEL_FILE)):
        return False
    try:
        with open(os.path.join(path, MODEL_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_model_target(path: str, replace: bool) -> None:
    """Raise ModelError unless a model may be written at ``path``: new, an empty directory, or (with
    ``replace``) a dnnad model. Nothing else is ever deleted."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ModelError(f"{path} exists and is not a directory")
    if not os.listdir(path):
        return
    if not is_model_dir(path):
        raise ModelError(f"{path} is not empty and holds no dnnad model ({MODEL_FILE}); "
                         f"name a new or empty directory")
    if not replace:
        raise ModelError(f"{path} already holds a dnnad model; pass --overwrite to replace it")


def save_model(model: FittedModel, path: str, replace: bool = False) -> None:
    """Write ``model`` to ``path`` atomically (a sibling directory renamed into place)."""
    check_model_target(path, replace)
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
        pq.write_table(pa.table({"id": pa.array(model.ids.tolist(), pa.string())}),
                       os.path.join(tmp, "normal.parquet"))
        np.save(os.path.join(tmp, "calibration.npy"), np.asarray(model.calibration_scores, np.float64),
                allow_pickle=False)
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "k": model.k, "threshold": model.threshold,
               "shards": shard_meta, "meta": asdict(model.meta)}
        with open(os.path.join(tmp, MODEL_FILE), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        old = None
        if os.path.isdir(path):  # empty, or a dnnad model with replace: checked above
            old = tempfile.mkdtemp(prefix=".model-old-", dir=parent)
            os.replace(path, os.path.join(old, "m"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise ModelError(f"damaged model {path}: {what}")


def load_model(path: str) -> FittedModel:
    """Read and validate a saved model; any inconsistency is a one-line ModelError."""
    try:
        with open(os.path.join(path, MODEL_FILE)) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {os.path.join(path, MODEL_FILE)}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{path} is not a dnnad model")
    if doc.get("version") != FORMAT_VERSION:
        raise ModelError(f"{path} is a dnnad model of format version {doc.get('version')}; this dnnad reads "
                         f"version {FORMAT_VERSION}: fit it again")
    try:
        names = {f.name for f in fields(ModelMeta)}
        meta = ModelMeta(**{k: v for k, v in doc["meta"].items() if k in names})
        k, threshold, shard_docs = doc["k"], doc["threshold"], doc["shards"]
        shards = []
        for i, sm in enumerate(shard_docs):
            mapped = meta.index_kind in COMPRESSED_KINDS  # codes in memory, vectors read on demand
            vec = np.load(os.path.join(path, f"shard-{i:03d}.npy"), allow_pickle=False,
                          mmap_mode="r" if mapped else None)
            fb = np.fromfile(os.path.join(path, f"shard-{i:03d}.faiss"), dtype=np.uint8) if sm["faiss"] else None
            _check(vec.dtype == np.float32 and vec.ndim == 2 and vec.shape == (sm["rows"], meta.dim), path,
                   f"shard {i} holds {vec.dtype} {vec.shape}, expected float32 ({sm['rows']}, {meta.dim})")
            _check(bool(np.isfinite(vec).all()), path, f"shard {i} holds NaN or inf")
            shards.append(Shard(int(sm["offset"]), vec if mapped else np.ascontiguousarray(vec), fb))
        ids = np.asarray(pq.read_table(os.path.join(path, "normal.parquet"))["id"].to_pylist(), dtype=object)
        calib = np.load(os.path.join(path, "calibration.npy"), allow_pickle=False)
    except (OSError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"damaged model {path}: {type(e).__name__}: {e}") from None
    offsets = np.cumsum([0] + [len(s.vectors) for s in shards])
    _check(len(shards) >= 1 and all(s.offset == o for s, o in zip(shards, offsets)), path,
           "shard offsets are not contiguous")
    _check(int(offsets[-1]) == meta.n_reference == len(ids), path,
           f"{offsets[-1]} vectors, {len(ids)} ids, {meta.n_reference} reference rows recorded")
    _check(isinstance(k, int) and 1 <= k <= meta.n_reference, path, f"k={k!r}")
    _check(isinstance(threshold, (int, float)) and math.isfinite(threshold), path, f"threshold={threshold!r}")
    _check(calib.ndim == 1 and len(calib) == meta.n_normal and bool(np.isfinite(calib).all()), path,
           "calibration scores do not match the normal set")
    _check(not any(i is None for i in ids), path, "null reference ids")
    return FittedModel(shards, ids, k, float(threshold), meta, np.sort(calib.astype(np.float64)))


def model_from_fit(fit, shards: list[Shard], params, **embedding: object) -> FittedModel:
    """The saved form of a ``dn2.Fit`` built with ``params`` (``FitParams``); ``embedding`` adds how the
    vectors were made (backbone, image_size, weights, weights_identity, normal_source, normal_labels)."""
    calib = np.asarray(fit.calibration_scores, dtype=np.float64)
    meta = ModelMeta(
        dim=int(fit.reference.shape[1]), n_normal=int(fit.n_normal), n_reference=len(fit.ids),
        k_requested=params.k, threshold_quantile=fit.threshold_quantile,
        threshold_reliable=fit.threshold_reliable, index_kind=params.index, n_shards=len(shards),
        reduction=fit.reduction, loo_score_quantiles={str(p): float(np.quantile(calib, p)) for p in (0.5, 0.9, 0.99)},
        **embedding)
    return FittedModel(list(shards), np.asarray(fit.ids, dtype=object), fit.k, fit.threshold, meta, np.sort(calib))
