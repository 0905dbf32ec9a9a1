"""Backbones: ImageNet CNNs whose globally average-pooled penultimate features are the embedding.

Options (``BackboneSpec``): ``layers`` concatenates the global average pools of named intermediate modules
(and/or ``final``, the penultimate features), each L2-normalised; ``tta="flip"`` averages the embedding
with that of the horizontally flipped image; ``resize="full"`` resizes the whole image to the input size
instead of resizing and centre-cropping.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.features import l2_normalize
from .specs import FINAL, BackboneSpec


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
    if spec.family == "torchvision":
        model.fc = torch.nn.Identity()
    else:
        model.reset_classifier(0)
    return model


def preprocess_fn(spec: BackboneSpec):
    """PIL RGB image → normalised float32 CHW tensor: resize shorter side and centre crop (``crop``) or
    resize the whole image to a square (``full``), then normalise."""
    from torchvision import transforms as T

    size, bilinear = spec.image_size, T.InterpolationMode.BILINEAR
    geometry = ([T.Resize((size, size), interpolation=bilinear)] if spec.resize == "full" else
                [T.Resize(int(round(size / 0.875)), interpolation=bilinear), T.CenterCrop(size)])
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


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
    """A backbone ready to embed preprocessed batches: ``(n, 3, H, W) float32 → (n, d) float32``."""

    def __init__(self, spec: BackboneSpec, state_dict: dict | None, device: str = "auto",
                 threads: int | None = None):
        self.spec = spec
        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.half = device.startswith("cuda")
        if spec.family == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.half else ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(spec.arch, opts, providers=providers)
            self.input_name = self.session.get_inputs()[0].name
            self.output_name = spec.output or self.session.get_outputs()[0].name
            return
        model = build_classifier(spec)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.model = strip_head(model, spec).eval().to(device)
        if self.half:
            self.model = self.model.half()
        self._pooled: dict[str, torch.Tensor] = {}
        for name, module in tap_modules(self.model, spec).items():
            module.register_forward_hook(lambda _m, _i, out, name=name: self._pooled.__setitem__(name, _gap(out)))

    @torch.inference_mode()
    def taps(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Pooled features of one view, by layer name (``final`` always included), float32, unnormalised."""
        if self.spec.family == "onnx":
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
            out = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2) if out.ndim > 2 else out
            return {FINAL: np.ascontiguousarray(out, dtype=np.float32)}
        self._pooled.clear()
        x = x.to(self.device, dtype=torch.float16 if self.half else torch.float32)
        final = self.model(x).float().cpu().numpy()
        return {FINAL: final, **{n: v.cpu().numpy() for n, v in self._pooled.items()}}

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        views = [x, torch.flip(x, dims=[3])] if self.spec.tta == "flip" else [x]
        return embed_from_taps([self.taps(v) for v in views], self.spec.layers)


def _gap(out: torch.Tensor) -> torch.Tensor:
    """Global average pool of a module's output, float32, shape (n, channels)."""
    out = out.float()
    return out.flatten(2).mean(2) if out.ndim > 2 else out
