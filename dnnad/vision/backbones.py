"""Backbones: ImageNet CNNs whose globally average-pooled penultimate features are the embedding.

Options (``BackboneSpec``): ``layers`` concatenates the global average pools of named intermediate modules
(and/or ``final``, the penultimate features), each L2-normalised; ``tta="flip"`` averages the embedding
with that of the horizontally flipped image; ``resize="full"`` resizes the whole image to the input size
instead of resizing and centre-cropping.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.arrays import l2_normalize
from .preprocess import crop_fn, normalize_batch
from .specs import FINAL, PATCHES, BackboneSpec

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureExtractor", "build_classifier", "crop_fn", "embed_from_taps", "normalize_batch",
           "preprocess_fn", "strip_head", "tap_modules"]


def build_classifier(spec: BackboneSpec) -> torch.nn.Module:
    """The full ImageNet network (with its classification head), randomly initialised."""
    if spec.family == "torchvision":
        import torchvision

        return torchvision.models.get_model(spec.arch, weights=None)
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False)
    raise ValueError(f"{spec.name} is not a torch backbone")


def strip_head(model: torch.nn.Module, spec: BackboneSpec) -> torch.nn.Module:
    """Drop the classifier so the forward pass returns pooled penultimate features."""
    import torch

    if spec.family == "torchvision":
        model.fc = torch.nn.Identity()
    else:
        model.reset_classifier(0)
    return model


def preprocess_fn(spec: BackboneSpec):
    """PIL RGB image → normalised float32 CHW tensor (one image; the Embedder crops per image and
    normalises whole batches)."""
    import torch

    crop = crop_fn(spec)
    return lambda img: torch.from_numpy(normalize_batch(spec, crop(img)[None])[0])


def tap_modules(model: torch.nn.Module, spec: BackboneSpec) -> dict[str, torch.nn.Module]:
    """The modules ``spec.layers`` names (``final`` excepted); ValueError naming the choices if one is unknown."""
    named = dict(model.named_modules())
    for name in spec.layers:
        if name != FINAL and name not in named:
            top = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"--layers: {spec.name} has no module {name!r} (use dotted module names such as "
                             f"blocks.5 or layer3, or {FINAL}; top-level modules: {top})")
    return {n: named[n] for n in spec.layers if n != FINAL}


def embed_from_taps(views: list[dict[str, np.ndarray]], layers: tuple[str, ...]) -> np.ndarray:
    """The embedding from pooled features per view (the image, and its flip with TTA): plain final features
    without ``layers``, else the named pools each L2-normalised and concatenated; averaged over views."""
    def one(taps: dict[str, np.ndarray]) -> np.ndarray:
        return taps[FINAL] if not layers else np.concatenate([l2_normalize(taps[n]) for n in layers], axis=1)

    return np.ascontiguousarray(np.mean([one(v) for v in views], axis=0), dtype=np.float32)


class FeatureExtractor:
    """A backbone ready to embed preprocessed batches: ``(n, 3, H, W) float32 → (n, d) float32``.

    ``onnx_model``: the backbone's export (``runtimes.cached_export``) run by ONNX Runtime instead of torch,
    the same pooled features within 1e-5 relative; an ``onnx:`` backbone always runs there."""

    def __init__(self, spec: BackboneSpec, state_dict: dict | None, device: str = "auto",
                 threads: int | None = None, onnx_model: bytes | None = None, runtime: str = "onnxruntime"):
        self.spec = spec
        self.onnx = None
        self._runtime = "torch"
        if spec.family == "onnx" or onnx_model is not None:  # no torch in this process for an ONNX model
            from .onnx_session import OnnxTaps, OpenVinoTaps

            self.device = "cpu" if device == "auto" else device
            self.half = self.device.startswith("cuda")
            model, output = onnx_model if onnx_model is not None else spec.arch, \
                spec.output if spec.family == "onnx" else None
            self._runtime = "openvino" if runtime == "openvino" and not self.half else "onnxruntime"
            self.onnx = OpenVinoTaps(model, threads, output, spec.precision) if self._runtime == "openvino" else \
                OnnxTaps(model, threads, self.half, output)
            return
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.half = device.startswith("cuda")
        model = build_classifier(spec)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.model = strip_head(model, spec).eval().to(device)
        if self.half:  # fp16 + channels_last: tensor-core convolutions
            self.model = self.model.half().to(memory_format=torch.channels_last)
        self._pooled: dict[str, torch.Tensor] = {}
        for name, module in tap_modules(self.model, spec).items():
            module.register_forward_hook(lambda _m, _i, out, name=name: self._pooled.__setitem__(name, _gap(out)))
        self._patches = None
        if spec.patches:
            from .patches import PatchTaps

            self._patches = PatchTaps(self.model, spec)

    @property
    def runtime(self) -> str:
        return self._runtime

    def taps(self, x: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Pooled features of one view, by layer name (``final`` always included), float32, unnormalised; with
        ``spec.patches`` also the patch feature map ``PATCHES`` (n, d, h, w)."""
        if self.onnx is not None:
            return self.onnx(np.asarray(x))
        import torch

        with torch.inference_mode():
            self._pooled.clear()
            x = torch.as_tensor(x).to(self.device, dtype=torch.float16 if self.half else torch.float32,
                                      non_blocking=True)
            if self.half:
                x = x.contiguous(memory_format=torch.channels_last)
            final = self.model(x).float().cpu().numpy()
            if self._patches is not None:
                self._pooled[PATCHES] = self._patches.features()
            return {FINAL: final, **{n: v.cpu().numpy() for n, v in self._pooled.items()}}

    def with_patches(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, H, W) → embeddings (n, d) and patch features (n, h, w, d_p), float32 (no TTA: the map is of
        the image as the network saw it)."""
        taps = self.taps(x)
        patches = np.ascontiguousarray(np.asarray(taps.pop(PATCHES), np.float32).transpose(0, 2, 3, 1))
        return embed_from_taps([taps], self.spec.layers), patches

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) float32 (numpy or torch) → (n, d) float32 embeddings."""
        if self.spec.tta == "flip":
            flipped = np.ascontiguousarray(np.asarray(x)[..., ::-1]) if isinstance(x, np.ndarray) else x.flip(3)
            views = [x, flipped]
        else:
            views = [x]
        return embed_from_taps([self.taps(v) for v in views], self.spec.layers)


def _gap(out: torch.Tensor) -> torch.Tensor:
    """Global average pool of a module's output, float32, shape (n, channels)."""
    out = out.float()
    return out.flatten(2).mean(2) if out.ndim > 2 else out
