"""CPU runtimes for torch backbones: the same network, exported once to ONNX and run by ONNX Runtime.

The export holds the backbone and the global average pools of every ``--layers`` module; L2 normalisation,
concatenation and ``--tta`` averaging stay in ``backbones.embed_from_taps``, so each runtime makes the same
embedding from the same pooled features (equal to torch's within 1e-5 relative, ``tests/test_backbones.py``).
An export is keyed by the weights' content and the read-out and cached on the driver (``$DNNAD_CACHE`` or
``~/.cache/dnnad``); the job sends its bytes through Ray's object store, so a cluster exports once.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings

import torch

from .backbones import _gap, build_classifier, strip_head, tap_modules
from .patches import VERSION as PATCH_VERSION
from .patches import PatchTaps
from .specs import FINAL, PATCHES, BackboneSpec, resolve_runtime, runtime_version

__all__ = ["TapNet", "cached_export", "export_key", "export_onnx", "resolve_runtime", "runtime_version"]

ONNX_OPSET = 17
CACHE_ENV = "DNNAD_CACHE"
EXPORT_MARKER = ".dnnad-onnx-cache"  # a cache directory dnnad made; files in it are written by rename


class TapNet(torch.nn.Module):
    """The backbone returning its pooled penultimate features, the pools of ``spec.layers`` in order, and with
    ``spec.patches`` the patch feature map (``vision.patches``) last."""

    def __init__(self, spec: BackboneSpec, state_dict: dict | None):
        super().__init__()
        model = build_classifier(spec)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.model = strip_head(model, spec).eval()
        self.names = [n for n in spec.layers if n != FINAL]
        self._pooled: dict[str, torch.Tensor] = {}
        for name, module in tap_modules(self.model, spec).items():
            module.register_forward_hook(lambda _m, _i, out, name=name: self._pooled.__setitem__(name, _gap(out)))
        self.patches = PatchTaps(self.model, spec) if spec.patches else None
        if self.patches is not None:
            self.names.append(PATCHES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._pooled.clear()
        final = self.model(x)
        if self.patches is not None:
            self._pooled[PATCHES] = self.patches.features()
        return (final, *(self._pooled[n] for n in self.names))


def weights_digest(state_dict: dict | None) -> str:
    """Content hash of a state dict (names, dtypes, shapes, values): what an export is keyed by."""
    h = hashlib.sha256()
    for name, t in sorted((state_dict or {}).items()):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def export_key(spec: BackboneSpec, state_dict: dict | None) -> str:
    what = f"{spec.family}:{spec.arch}:{spec.image_size}:{','.join(spec.layers)}:{ONNX_OPSET}:{torch.__version__}" \
        + (f":P{','.join(spec.patches)}:v{PATCH_VERSION}" if spec.patches else "")
    return hashlib.sha256(f"{what}:{weights_digest(state_dict)}".encode()).hexdigest()[:24]


def export_onnx(spec: BackboneSpec, state_dict: dict | None) -> bytes:
    """The backbone with its taps as ONNX (opset 17, batch dimension dynamic)."""
    net = TapNet(spec, state_dict)
    x = torch.zeros(2, 3, spec.image_size, spec.image_size)
    outputs = [FINAL, *net.names]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices: not the user's concern
        torch.onnx.export(net, (x,), buf, input_names=["pixels"], output_names=outputs, opset_version=ONNX_OPSET,
                          dynamic_axes={"pixels": {0: "n"}, **{o: {0: "n"} for o in outputs}}, dynamo=False)
    return buf.getvalue()


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dnnad")


def cached_export(spec: BackboneSpec, state_dict: dict | None, root: str | None = None) -> bytes:
    """The ONNX export of this backbone and read-out, from the driver's cache or made (and cached) now. The
    cache lives in its own marked subdirectory; an unwritable cache only costs the export next time."""
    folder = os.path.join(root or cache_root(), "onnx")
    path = os.path.join(folder, f"{spec.arch.replace('/', '_')}-{spec.image_size}-{export_key(spec, state_dict)}.onnx")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    data = export_onnx(spec, state_dict)
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, EXPORT_MARKER), "a").close()
        fd, tmp = tempfile.mkstemp(prefix=".export-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass
    return data
