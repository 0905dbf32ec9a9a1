"""Ray Data ``map_batches`` callable: rows (id, path | image bytes) → (id, embedding, status, error).

Reading and decoding happen here, in the workers. A row that cannot be read or decoded keeps its
place with ``status="error"``, the reason in ``error`` and a NaN embedding; it never fails the batch.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from ray.data.extensions import ArrowTensorArray

from .backbones import BackboneSpec, FeatureExtractor, preprocess_fn
from .decode import DecodeError, decode_image

PASSTHROUGH = ("group", "label", "split")


def read_bytes(uri: str, cache: dict) -> bytes:
    """File bytes from a local path or a pyarrow-filesystem URI; read errors become DecodeError."""
    scheme, sep, rest = uri.partition("://")
    scheme, path = (scheme, rest) if sep else ("", uri)  # pyarrow's path of s3://b/k is b/k
    try:
        if scheme not in cache:  # one filesystem per scheme and actor, not one per file
            cache[scheme] = pafs.FileSystem.from_uri(uri)[0] if scheme else pafs.LocalFileSystem()
        with cache[scheme].open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DecodeError("file not found (missing or a broken link)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as e:
        msg = str(e)
        if "ermission denied" in msg:
            raise DecodeError("permission denied") from None
        if "No such file" in msg or "not found" in msg.lower():
            raise DecodeError("file not found (missing or a broken link)") from None
        raise DecodeError(f"read error: {msg}") from None


class Embedder:
    """Embedding actor: the backbone is built once per actor from weights shared via Ray's object store."""

    def __init__(self, spec: BackboneSpec, weights, device: str = "auto", threads: int | None = None,
                 max_pixels: int | None = None, cache=None, batch_size: int = 64):
        import ray

        get = lambda r: ray.get(r) if isinstance(r, ray.ObjectRef) else r  # noqa: E731
        state = get(weights)
        self.cache = get(cache)
        self.extractor = FeatureExtractor(spec, state, device=device, threads=threads)
        self.preprocess = preprocess_fn(spec)
        self.dim: int | None = None
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._fs: dict = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["id"]
        n = len(ids)
        paths = batch.get("path", [None] * n)
        images = batch.get("image", [None] * n)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, None, dtype=object)
        hashes = np.full(n, None, dtype=object)
        cached = np.zeros(n, dtype=bool)
        hits: dict[int, np.ndarray] = {}
        tensors, ok = [], []
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        for i in range(n):
            try:
                data = images[i]
                if data is None and paths[i] is not None:
                    data = read_bytes(str(paths[i]), self._fs)
                if self.cache is not None and data:
                    hashes[i] = hashlib.sha256(data).hexdigest()
                    hit = self.cache.lookup(hashes[i].encode())
                    if hit is not None:
                        hits[i], cached[i] = hit, True
                        continue
                tensors.append(self.preprocess(decode_image(data, **kwargs)))
                ok.append(i)
            except DecodeError as e:
                status[i], error[i] = "error", str(e)
            except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure is still one row's error
                status[i], error[i] = "error", f"decode failed: {type(e).__name__}: {e}"
        feats = self.forward(torch.stack(tensors)) if tensors else None
        if self.dim is None:
            self.dim = feats.shape[1] if feats is not None else self._probe_dim()
        emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        if feats is not None:
            emb[ok] = feats
        for i, v in hits.items():
            emb[i] = v
        out = {"id": pa.array([str(i) for i in ids], pa.string()), "embedding": ArrowTensorArray.from_numpy(emb),
               "status": pa.array(status.tolist(), pa.string()), "error": pa.array(error.tolist(), pa.string())}
        if self.cache is not None:
            out["hash"], out["cached"] = pa.array(hashes.tolist(), pa.string()), pa.array(cached)
        out.update({c: pa.array(batch[c].tolist()) for c in PASSTHROUGH if c in batch})
        return pa.table(out)

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Features in fixed-size chunks, the last one zero-padded: every forward pass has the same
        shape, so an image's embedding is bit-identical however rows were partitioned into batches."""
        b = self.batch_size
        out = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            n = len(chunk)
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            out.append(self.extractor(chunk)[:n])
        return np.concatenate(out)

    def _probe_dim(self) -> int:
        size = self.extractor.spec.image_size
        return int(self.extractor(torch.zeros(1, 3, size, size)).shape[1])
