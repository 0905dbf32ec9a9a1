"""Backbones: ImageNet CNNs whose globally average-pooled penultimate features are the embedding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_BACKBONE = "efficientnet_lite2"


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and how its input is prepared."""

    name: str
    family: str  # torchvision | timm | onnx
    arch: str  # constructor name, or the ONNX file path
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str | None = None  # ONNX output name

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        return ("fc.",) if self.family == "torchvision" else ("classifier.",)


def backbone_names() -> list[str]:
    return [*TORCHVISION, *LITE_SIZES, "onnx:PATH[#output]"]


def get_spec(name: str, image_size: int | None = None) -> BackboneSpec:
    """Spec for a backbone name; ``image_size`` overrides the default crop size."""
    if name in TORCHVISION:
        return BackboneSpec(name, "torchvision", name, image_size or 224, IMAGENET_MEAN, IMAGENET_STD)
    if name in LITE_SIZES:
        arch = "tf_" + name
        return BackboneSpec(name, "timm", arch, image_size or LITE_SIZES[name], (0.5,) * 3, (0.5,) * 3)
    if name.startswith("onnx:"):
        path, _, output = name[5:].partition("#")
        return BackboneSpec(name, "onnx", path, image_size or 224, IMAGENET_MEAN, IMAGENET_STD, output or None)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}")


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
    """PIL RGB image → normalised float32 CHW tensor: resize shorter side, centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(spec.image_size / 0.875)), interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(spec.image_size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


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

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.spec.family == "onnx":
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
            out = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2) if out.ndim > 2 else out
            return np.ascontiguousarray(out, dtype=np.float32)
        x = x.to(self.device, dtype=torch.float16 if self.half else torch.float32)
        return self.model(x).float().cpu().numpy()
