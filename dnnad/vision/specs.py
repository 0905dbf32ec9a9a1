"""The backbone registry: names, input sizes and normalisation. Torch-free, so the CLI stays fast."""
from __future__ import annotations

from dataclasses import dataclass

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
