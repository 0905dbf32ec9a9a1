"""Embed stage: rows (id, path | image bytes) → (id, embedding, status, error) on a Ray actor pool.

``Embedder`` is the ``map_batches`` callable (the backbone is built once per actor); ``embed`` wires it.
Reading and decoding happen in the workers. A row that cannot be read or decoded keeps its place with
``status="error"``, the reason in ``error`` and a NaN embedding; it never fails the batch.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from ..config import DEFAULT_MAX_FILE_BYTES, ConfigError, EmbedConfig
from ..runtime import EMBED_ACTOR_GPUS, cluster_resources, embed_pool, resolved
from ..sources import NULL_ID, PASSTHROUGH, read_bytes
from ..vision.backbones import FeatureExtractor
from ..vision.decode import DecodeError, decode_image
from ..vision.fingerprint import fingerprint
from ..vision.preprocess import crop_fn, draft_size, normalize_batch
from ..vision.specs import EXPORTED_RUNTIMES, BackboneSpec, resolve_runtime

CALL_PIXEL_BYTES = 64 * 2**20
# Pixels per forward pass of an exported runtime on CPU: small chunks keep the activations in cache (Lite2 at
# 260 px, 1 thread, ONNX Runtime: 32.8 img/s in chunks of 4 against 24.7 in chunks of 64; OpenVINO 43.8 / 27.2).
CPU_FORWARD_PIXELS = 4 * 260 * 260
MAX_CHUNKS_PER_CALL = 16


class Embedder:
    """Embedding actor: the backbone is built once per actor from weights shared via Ray's object store."""

    def __init__(self, spec: BackboneSpec, weights, device: str = "auto", threads: int | None = None,
                 max_pixels: int | None = None, cache=None, cache_out: str | None = None, batch_size: int = 64,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, hash_bytes: bool = False, onnx_model=None,
                 runtime: str = "onnxruntime", fingerprints: bool = False):
        onnx_model = resolved(onnx_model)  # the backbone's ONNX export: then the torch weights are not needed
        state = resolved(weights) if onnx_model is None else None
        self.cache = resolved(cache)
        self.cache_out = cache_out  # where this actor adds the embeddings it computed (content-keyed parts)
        self.extractor = FeatureExtractor(spec, state, device=device, threads=threads, onnx_model=onnx_model,
                                          runtime=runtime)
        self.spec = spec
        self.crop = crop_fn(spec)
        self.draft = draft_size(spec) if spec.decode == "reduced" else None
        self.dim: int | None = None
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.hash_bytes = hash_bytes or self.cache is not None  # sha256 of each file's bytes in ``hash``
        self.fingerprints = fingerprints  # each image's low-level fingerprint in ``fingerprint`` (duplicates)
        self.localize = bool(spec.patches)  # patch grids in ``patches`` and image sizes in ``width``/``height``
        self.grid: tuple | None = None
        self._fs: dict = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["id"]
        n = len(ids)
        paths = batch.get("path", [None] * n)
        images = batch.get("image", [None] * n)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, None, dtype=object)
        hashes = np.full(n, None, dtype=object)
        prints = np.full(n, None, dtype=object)
        cached = np.zeros(n, dtype=bool)
        sizes = np.zeros((n, 2), dtype=np.int64)
        hits: dict[int, np.ndarray] = {}
        pixels, ok = [], []
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        kwargs["draft"] = self.draft
        for i in range(n):
            try:
                if ids[i] is None:
                    raise DecodeError(NULL_ID)
                data = images[i]
                if data is None and paths[i] is not None:
                    data = read_bytes(str(paths[i]), self._fs, self.max_file_bytes)
                if self.hash_bytes and data:
                    hashes[i] = hashlib.sha256(data).hexdigest()
                use_cache = self.cache is not None and data and not self.localize  # the cache holds no patches
                hit = self.cache.lookup(hashes[i].encode()) if use_cache else None
                img = decode_image(data, **kwargs) if hit is None or self.fingerprints else None
                if self.fingerprints:
                    prints[i] = fingerprint(img).tobytes()
                if hit is not None:
                    hits[i], cached[i] = hit, True
                    continue
                sizes[i] = img.size
                pixels.append(self.crop(img))
                ok.append(i)
            except DecodeError as e:
                status[i], error[i] = "error", str(e)
            except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure is still one row's error
                status[i], error[i] = "error", f"decode failed: {type(e).__name__}: {e}"
        feats = grids = None
        if pixels:
            x = normalize_batch(self.spec, np.stack(pixels))
            feats, grids = self.forward_patches(x) if self.localize else (self.forward(x), None)
        if self.dim is None:
            self.dim = feats.shape[1] if feats is not None else self._probe_dim()
        emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        if feats is not None:
            emb[ok] = feats
        for i, v in hits.items():
            emb[i] = v
        out = {"id": pa.array([None if i is None else str(i) for i in ids], pa.string()),
               "embedding": ArrowTensorArray.from_numpy(emb),
               "status": pa.array(status.tolist(), pa.string()), "error": pa.array(error.tolist(), pa.string())}
        if self.hash_bytes:
            out["hash"] = pa.array(hashes.tolist(), pa.string())
        if self.fingerprints:
            out["fingerprint"] = pa.array(prints.tolist(), pa.binary())
        if self.localize:
            if grids is not None:
                self.grid = grids.shape[1:]
            all_grids = np.full((n, *(self.grid or self._probe_grid())), np.nan, dtype=np.float32)
            if grids is not None:
                all_grids[ok] = grids
            out["patches"] = ArrowTensorArray.from_numpy(all_grids)
            out["width"], out["height"] = pa.array(sizes[:, 0]), pa.array(sizes[:, 1])
        if self.cache is not None:
            out["cached"] = pa.array(cached)
            if self.cache_out and feats is not None:
                from .cache import append_part

                append_part(self.cache_out, hashes[ok].tolist(), feats)
        out.update({c: pa.array(batch[c].tolist()) for c in PASSTHROUGH if c in batch})
        return pa.table(out)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Features in chunks: torch's (and any GPU's) of the batch size, torch's last one zero-padded, so every
        torch forward pass has the same shape and an image's embedding is bit-identical however rows were
        partitioned into batches. ONNX Runtime and OpenVINO compute each image alone on CPU (the same bits at
        any batch size, ``tests/test_backbones.py``): their chunks are cache-sized (``CPU_FORWARD_PIXELS``)
        and a short one runs as it is (a filtered source's 45-row blocks once spent 30 % of the work on padding)."""
        return np.concatenate([f[0] for f in self._chunks(x, lambda c: (self.extractor(c),))])

    def forward_patches(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (n, d) and patch grids (n, h, w, d_p) in the chunks ``forward`` uses."""
        parts = self._chunks(x, self.extractor.with_patches)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _chunks(self, x: np.ndarray, fn) -> list[tuple[np.ndarray, ...]]:
        """``fn`` (a tuple of per-image arrays) over ``x`` in forward chunks, torch's last one zero-padded."""
        pad = self.extractor.runtime == "torch"
        b = self._chunk()
        out = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            n = len(chunk)
            if n < b and pad:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(tuple(a[:n] for a in fn(chunk)))
        return out

    def _chunk(self) -> int:
        pad = self.extractor.runtime == "torch"
        return self.batch_size if pad or self.extractor.half else \
            max(1, min(self.batch_size, CPU_FORWARD_PIXELS // self.spec.image_size ** 2))

    def _probe_grid(self) -> tuple:
        size = self.spec.image_size
        self.grid = self.extractor.with_patches(np.zeros((1, 3, size, size), np.float32))[1].shape[1:]
        return self.grid

    def _probe_dim(self) -> int:
        size = self.extractor.spec.image_size
        return int(self.extractor(np.zeros((1, 3, size, size), np.float32)).shape[1])


def embed(ds, cfg: EmbedConfig, weights_ref, max_file_bytes: int, cache_ref=None, score_actors: int | None = None,
          cache_out: str | None = None, hash_bytes: bool = False, fingerprints: bool = False):
    """Embedded dataset (lazy): id, embedding, status, error (+ passthrough; ``hash`` with ``hash_bytes``;
    ``fingerprint`` with ``fingerprints``;
    ``cached`` with a cache, whose new entries the actors write to ``cache_out`` as they go: nothing is
    collected on the driver)."""
    from ray.data import ActorPoolStrategy

    spec = cfg.spec()
    cpus, gpus = cluster_resources()
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda, but the Ray cluster has no GPUs")
    use_gpu = gpus > 0 and cfg.device != "cpu"
    if use_gpu and spec.precision == "bf16":
        raise ConfigError("--precision bf16 is OpenVINO's CPU inference: add --device cpu, or use fp32 on the GPU")
    if use_gpu:
        actors, threads, res = cfg.actors or gpus, cfg.threads, {"num_gpus": EMBED_ACTOR_GPUS}
    else:
        actors, threads, logical = embed_pool(cpus, cfg.actors, cfg.threads, score_actors)
        res = {"num_cpus": logical}
    # Rows per call: several forward chunks for small images (Ray's per-call cost spread over more images),
    # capped so that one call's float32 pixels stay near CALL_PIXEL_BYTES (forward chunks: Embedder.forward).
    onnx_ref, runtime = None, resolve_runtime(cfg.runtime, spec, use_gpu)
    if runtime in EXPORTED_RUNTIMES and spec.family != "onnx":
        onnx_ref = export_ref(spec, weights_ref)
    chunk_bytes = cfg.batch_size * 3 * spec.image_size ** 2 * 4
    rows = cfg.batch_size * max(1, min(MAX_CHUNKS_PER_CALL, CALL_PIXEL_BYTES // chunk_bytes))
    return ds.map_batches(
        Embedder, batch_size=rows, compute=ActorPoolStrategy(size=actors), batch_format="numpy",
        fn_constructor_kwargs={"spec": spec, "weights": weights_ref, "threads": threads,
                               "device": "cuda" if use_gpu else "cpu", "cache": cache_ref, "cache_out": cache_out,
                               "batch_size": cfg.batch_size, "max_file_bytes": max_file_bytes,
                               "hash_bytes": hash_bytes, "onnx_model": onnx_ref, "runtime": runtime,
                               "fingerprints": fingerprints}, **res,
    )


_EXPORTS: dict = {}  # (spec, weights ref) → object-store ref of the ONNX export: once per job, not per partition


def export_ref(spec: BackboneSpec, weights_ref):
    """The backbone's ONNX export (from the driver's cache, or made now), in the object store."""
    import ray

    from ..vision.runtimes import cached_export  # torch: on the driver only

    key = (spec, weights_ref.hex() if isinstance(weights_ref, ray.ObjectRef) else id(weights_ref))
    if key not in _EXPORTS:
        _EXPORTS[key] = ray.put(cached_export(spec, resolved(weights_ref)))
    return _EXPORTS[key]
