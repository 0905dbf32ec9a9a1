"""Backbones: ImageNet CNNs whose globally average-pooled penultimate features are the embedding."""
from __future__ import annotations

import numpy as np
import torch

from .specs import BackboneSpec


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


def crop_fn(spec: BackboneSpec):
    """PIL RGB image → (H, W, 3) uint8 array: resize the shorter side (bilinear), centre crop."""
    from torchvision import transforms as T

    resize_crop = T.Compose([
        T.Resize(int(round(spec.image_size / 0.875)), interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(spec.image_size),
    ])
    return lambda img: np.asarray(resize_crop(img))


def normalize_batch(spec: BackboneSpec, pixels: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 → normalised (n, 3, H, W) float32, contiguous, in one vectorised pass; elementwise,
    so bit-identical to torchvision's per-image ToTensor + Normalize."""
    pixels = np.ascontiguousarray(pixels) if pixels.flags.writeable else np.array(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def preprocess_fn(spec: BackboneSpec):
    """PIL RGB image → normalised float32 CHW tensor (one image; the Embedder crops per image and
    normalises whole batches)."""
    crop = crop_fn(spec)
    return lambda img: normalize_batch(spec, crop(img)[None])[0]


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
        if self.half:  # fp16 + channels_last: tensor-core convolutions
            self.model = self.model.half().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.spec.family == "onnx":
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
            out = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2) if out.ndim > 2 else out
            return np.ascontiguousarray(out, dtype=np.float32)
        x = x.to(self.device, dtype=torch.float16 if self.half else torch.float32, non_blocking=True)
        if self.half:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()
