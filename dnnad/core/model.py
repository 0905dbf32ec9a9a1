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
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from .features import FeatureTransform, load_transform, transform_files
from .index import Shard
from .settings import COMPRESSED_KINDS, FIT_SETTINGS, READABLE_VERSIONS, format_version
from .threshold import normal_percentile

FORMAT = "dnnad-model"
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
    layers: list | None = None  # --layers the embeddings were read from (None: final pooled features)
    tta: str | None = None  # --tta
    resize: str = "crop"  # --resize
    precision: str = "fp32"  # --precision: bf16 = OpenVINO's bf16 inference (not the fp32 embedding)
    decode: str = "exact"  # --decode: reduced = JPEGs decoded at a reduced scale (DCT scaling) when far larger
    normalize: str | None = None  # feature transform (core.features), applied before the index
    whiten: bool = False
    whiten_shrinkage: float | None = None
    pca: int | None = None  # principal components kept (then dim == pca)
    input_dim: int | None = None  # dimension of the embeddings before the transform, when it differs from dim
    approximate: bool = False  # compressed index scored from its codes (no exact re-rank), calibration included
    localize: bool = False  # a patch memory bank (bank-*.npy): scores, threshold and calibration are the maps'
    coreset: float | None = None  # fraction of normal patches the bank kept (None: all)
    patch_grid: list | None = None  # [h, w, d] of every image's patch grid
    n_bank: int | None = None  # patches in the bank
    n_calibration: int | None = None  # normal images whose scores set the threshold (localize: a sample)
    border_calibration: list | None = None  # localize: [means, stds] per ring of the map (core.patches)

    @property
    def query_dim(self) -> int:
        """Dimension of the embeddings this model scores."""
        return self.input_dim or self.dim


@dataclass
class FittedModel:
    """Everything scoring needs: the index shards, reference ids, k, threshold and how embeddings were made."""

    shards: list[Shard]
    ids: np.ndarray  # reference ids, aligned with index positions
    k: int
    threshold: float
    meta: ModelMeta
    calibration_scores: np.ndarray  # (n_normal,) scores the threshold was set from, sorted ascending
    transform: FeatureTransform = field(default_factory=FeatureTransform)  # applied to queries before the kNN
    bank: list[Shard] | None = None  # --localize: the normal patches' index shards
    bank_owners: np.ndarray | None = None  # (n_bank,) int64: the normal image (reference position) of each patch

    def normal_percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percentage of the normal set's calibration scores strictly below each score (100 = above all)."""
        return normal_percentile(self.calibration_scores, scores)


def is_model_dir(uri: str | None) -> bool:
    """Whether ``uri`` holds a model that dnnad wrote (its ``model.json`` names the format)."""
    if not uri:
        return False
    fs, path = storage.resolve(uri)
    doc = storage.read_json(fs, storage.join(path, MODEL_FILE))
    return doc is not None and doc.get("format") == FORMAT


def check_model_target(uri: str, replace: bool) -> None:
    """Raise ModelError unless a model may be written at ``uri``: new, an empty directory, or (with
    ``replace``) a dnnad model. Nothing else is ever deleted."""
    fs, path = storage.resolve(uri)
    if storage.is_local(fs) and os.path.islink(path):
        raise ModelError(f"{uri} is a symbolic link; name a directory")
    t = storage.kind(fs, path)
    if t == pafs.FileType.NotFound:
        return
    if t != pafs.FileType.Directory:
        raise ModelError(f"{uri} exists and is not a directory")
    if storage.is_empty_dir(fs, path):
        return
    if not is_model_dir(uri):
        raise ModelError(f"{uri} is not empty and holds no dnnad model ({MODEL_FILE}); "
                         f"name a new or empty directory")
    if not replace:
        raise ModelError(f"{uri} already holds a dnnad model; pass --overwrite to replace it")


META_DEFAULTS = {f.name: f.default for f in fields(ModelMeta) if f.default is not MISSING}


def _model_files(model: FittedModel) -> dict[str, Callable]:
    """Every file of the saved model as a function that writes it to an open file, ``model.json`` (the marker)
    last. Arrays stream out as they are: saving never holds a second copy of the reference vectors."""
    def npy(array):
        return lambda f: np.save(f, array, allow_pickle=False)

    def raw(data):
        return lambda f: f.write(data)

    files, shard_meta = {}, []
    for i, s in enumerate(model.shards):
        files[f"shard-{i:03d}.npy"] = npy(s.vectors)
        if s.faiss_bytes is not None:
            files[f"shard-{i:03d}.faiss"] = raw(s.faiss_bytes.data)
        shard_meta.append({"offset": s.offset, "rows": len(s.vectors), "faiss": s.faiss_bytes is not None})
    for i, s in enumerate(model.bank or []):
        files[f"bank-{i:03d}.npy"] = npy(s.vectors)
        if s.faiss_bytes is not None:
            files[f"bank-{i:03d}.faiss"] = raw(s.faiss_bytes.data)
        shard_meta.append({"bank": True, "offset": s.offset, "rows": len(s.vectors), "faiss": s.faiss_bytes is not None})
    if model.bank_owners is not None:
        files["bank_owners.npy"] = npy(np.asarray(model.bank_owners, np.int64))
    files["normal.parquet"] = lambda f: pq.write_table(pa.table({"id": pa.array(model.ids.tolist(), pa.string())}), f)
    files["calibration.npy"] = npy(np.asarray(model.calibration_scores, np.float64))
    for name, array in transform_files(model.transform).items():
        files[name] = npy(array)
    meta = asdict(model.meta)
    doc = {"format": FORMAT, "version": format_version(meta, META_DEFAULTS), "k": model.k, "threshold": model.threshold,
           "shards": shard_meta, "meta": meta}
    files[MODEL_FILE] = raw(json.dumps(doc, indent=2, default=str).encode())
    return files


def save_model(model: FittedModel, uri: str, replace: bool = False) -> None:
    """Write ``model`` to ``uri``: on a local disk atomically (a sibling directory renamed into place), on an
    object store file by file with ``model.json`` last, so a partial model is never taken for one."""
    check_model_target(uri, replace)
    fs, path = storage.resolve(uri)

    def write_files(directory: str) -> None:
        for name, write in _model_files(model).items():
            storage.write_with(fs, storage.join(directory, name), write)

    if not storage.is_local(fs):
        if storage.exists(fs, path):
            storage.delete(fs, path)  # a dnnad model, checked above
        write_files(path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    try:
        write_files(tmp)
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


def load_model(uri: str) -> FittedModel:
    """Read and validate a saved model; any inconsistency is a one-line ModelError."""
    fs, path = storage.resolve(uri)
    try:
        doc = json.loads(storage.read_bytes(fs, storage.join(path, MODEL_FILE)))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {storage.join(uri, MODEL_FILE)}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{path} is not a dnnad model")
    if doc.get("version") not in READABLE_VERSIONS:
        raise ModelError(f"{path} is a dnnad model of format version {doc.get('version')}; this dnnad reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}: fit it again")
    try:
        names = {f.name for f in fields(ModelMeta)}
        meta = ModelMeta(**{k: v for k, v in doc["meta"].items() if k in names})
        k, threshold, shard_docs = doc["k"], doc["threshold"], doc["shards"]
        bank_docs = [sm for sm in shard_docs if sm.get("bank")]
        shard_docs = [sm for sm in shard_docs if not sm.get("bank")]
        shards = [_load_shard(fs, path, f"shard-{i:03d}", f"shard {i}", sm, meta.dim, meta) for i, sm in enumerate(shard_docs)]
        # Read through the filesystem, not from Python bytes: Arrow frees a pre-buffered Python-owned buffer
        # on a pool thread, which aborts the process when that lands during interpreter exit (apache/arrow#34314).
        ids = np.asarray(pq.read_table(storage.join(path, "normal.parquet"), filesystem=fs, columns=["id"])
                         ["id"].to_pylist(), dtype=object)
        calib = storage.load_npy(fs, storage.join(path, "calibration.npy"))
        transform = load_transform(lambda name: storage.load_npy(fs, storage.join(path, name)), meta.normalize,
                                   meta.whiten, meta.whiten_shrinkage, meta.dim, meta.input_dim, meta.pca)
        bank, owners = _load_bank(fs, path, bank_docs, meta)
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
    _check(calib.ndim == 1 and len(calib) == (meta.n_calibration or meta.n_normal) and bool(np.isfinite(calib).all()),
           path, "calibration scores do not match the normal set")
    _check(not any(i is None for i in ids), path, "null reference ids")
    if meta.localize:
        _check(owners is not None and len(owners) == meta.n_bank and bool((owners >= 0).all())
               and bool((owners < meta.n_normal).all()), path, "patch bank owners do not match the normal set")
        border = meta.border_calibration
        _check(border is None or (np.shape(border)[0] == 2 and bool(np.isfinite(border).all())
                                  and bool((np.asarray(border)[1] > 0).all())), path, "border calibration is damaged")
    return FittedModel(shards, ids, k, float(threshold), meta, np.sort(calib.astype(np.float64)), transform,
                       bank, owners)


def _load_shard(fs, path: str, stem: str, name: str, sm: dict, d: int, meta: ModelMeta) -> Shard:
    """One shard of the index or the patch bank (files ``stem``.npy / .faiss), checked against its record;
    a compressed kind on a local disk keeps its codes in memory and memory-maps its vectors."""
    mapped = meta.index_kind in COMPRESSED_KINDS and storage.is_local(fs)
    npy = storage.join(path, f"{stem}.npy")
    vec = np.load(npy, allow_pickle=False, mmap_mode="r") if mapped else storage.load_npy(fs, npy)
    fb = (np.frombuffer(storage.read_bytes(fs, storage.join(path, f"{stem}.faiss")), dtype=np.uint8)
          if sm.get("faiss") else None)
    _check(vec.dtype == np.float32 and vec.ndim == 2 and vec.shape == (sm["rows"], d), path,
           f"{name} holds {vec.dtype} {vec.shape}, expected float32 ({sm['rows']}, {d})")
    _check(bool(np.isfinite(vec).all()), path, f"{name} holds NaN or inf")
    return Shard(int(sm["offset"]), vec if mapped else np.ascontiguousarray(vec), fb)


def _load_bank(fs, path: str, docs: list[dict], meta: ModelMeta) -> tuple[list[Shard] | None, np.ndarray | None]:
    """The patch bank's shards and owners of a ``--localize`` model (None, None for others)."""
    if not meta.localize:
        return None, None
    _check(bool(docs) and meta.patch_grid is not None and len(meta.patch_grid) == 3, path, "no patch bank")
    bank = [_load_shard(fs, path, f"bank-{i:03d}", f"bank shard {i}", sm, int(meta.patch_grid[2]), meta)
            for i, sm in enumerate(docs)]
    owners = storage.load_npy(fs, storage.join(path, "bank_owners.npy")).astype(np.int64)
    return bank, owners


def with_bank(model: FittedModel, bank: list[Shard], owners: np.ndarray, loo_scores: np.ndarray, threshold: float,
              grid: tuple[int, int, int], coreset: float | None, border: np.ndarray | None = None) -> FittedModel:
    """A fitted model turned into a localising one: its patch bank, and the threshold and calibration of the
    normal images' leave-one-image-out map scores in place of the global ones, and ``border``
    (``core.patches.border_calibration``) the scores were taken with."""
    from dataclasses import replace

    calib = np.sort(np.asarray(loo_scores, dtype=np.float64))
    meta = replace(model.meta, localize=True, coreset=coreset, patch_grid=[int(v) for v in grid],
                   n_bank=int(sum(len(s.vectors) for s in bank)), n_calibration=len(calib),
                   border_calibration=None if border is None else np.asarray(border, np.float64).tolist(),
                   loo_score_quantiles={str(p): float(np.quantile(calib, p)) for p in (0.5, 0.9, 0.99)})
    return replace(model, threshold=float(threshold), meta=meta, calibration_scores=calib, bank=list(bank),
                   bank_owners=np.asarray(owners, np.int64))


def model_from_fit(fit, shards: list[Shard], params, embedding: dict | None = None,
                   **provenance: object) -> FittedModel:
    """The saved form of a ``dn2.Fit`` built with ``params`` (``FitParams``): every fit setting recorded from
    ``params`` (``core.settings``), how the vectors were made from ``embedding`` (``ModelMeta`` fields of the
    image settings; None for precomputed vectors) and ``provenance`` (weights_identity, normal_source,
    normal_labels); the feature transform comes from the fit."""
    calib = np.asarray(fit.calibration_scores, dtype=np.float64)
    settings = {s.meta: s.to_meta(getattr(params, s.fit)) for s in FIT_SETTINGS if s.meta}
    settings["n_shards"] = len(shards)  # never more shards than rows
    meta = ModelMeta(
        dim=int(fit.reference.shape[1]), n_normal=int(fit.n_normal), n_reference=len(fit.ids),
        threshold_quantile=fit.threshold_quantile, threshold_reliable=fit.threshold_reliable,
        reduction=fit.reduction, loo_score_quantiles={str(p): float(np.quantile(calib, p)) for p in (0.5, 0.9, 0.99)},
        whiten_shrinkage=fit.transform.shrinkage,
        input_dim=fit.input_dim if fit.input_dim != fit.reference.shape[1] else None,
        **settings, **(embedding or {}), **provenance)
    return FittedModel(list(shards), np.asarray(fit.ids, dtype=object), fit.k, fit.threshold, meta, np.sort(calib),
                       fit.transform)
