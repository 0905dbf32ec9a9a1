"""The backbone registry: names, input sizes and normalisation. Torch-free, so the CLI stays fast."""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_BACKBONE = "efficientnet_lite2"
FINAL = "final"  # --layers name of the pooled penultimate features (what plain DN2 uses)
TTA_MODES = ("flip",)
RESIZE_MODES = ("crop", "full")
PATCHES = "patches"  # the output holding the patch feature map (localisation)
# Stages whose feature maps make the patch features (--localize): stride 8 and 16, as PatchCore takes ResNet's
# layer2 + layer3; for the Lite family blocks.2 (48 ch) + blocks.4 (120 ch), chosen on MTD
# (benchmarks/localise.py).
PATCH_STAGES = {**{n: ("layer2", "layer3") for n in TORCHVISION}, **{n: ("blocks.2", "blocks.4") for n in LITE_SIZES}}
PRECISIONS = ("fp32", "bf16")  # bf16: OpenVINO's bf16 inference (vision.onnx_session)
DECODE_MODES = ("exact", "reduced")  # reduced: large JPEGs decoded at a reduced scale (vision.preprocess)
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")  # auto: ONNX Runtime on CPU, torch on GPU
EXPORTED_RUNTIMES = ("onnxruntime", "openvino")  # run the backbone's ONNX export (vision.runtimes)


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
    layers: tuple[str, ...] = ()  # () = the final pooled features; else module names and/or FINAL, concatenated
    tta: str | None = None  # "flip": average with the horizontally flipped image
    resize: str = "crop"  # crop: shorter side to size/0.875 then centre crop; full: whole image to size x size
    decode: str = "exact"  # exact | reduced (JPEG DCT scaling down to twice the resize size)
    precision: str = "fp32"  # fp32 | bf16 (OpenVINO)
    patches: tuple[str, ...] = ()  # stages of the patch feature map (output PATCHES); () = no localisation

    @property
    def feature_tag(self) -> str:
        """How features are read, for cache keys: empty for plain DN2 features."""
        parts = ([f"L{'+'.join(self.layers)}"] if self.layers else []) + ([self.tta] if self.tta else []) \
            + (["full"] if self.resize != "crop" else []) + (["reduced"] if self.decode != "exact" else []) \
            + ([self.precision] if self.precision != "fp32" else []) \
            + ([f"P{'+'.join(self.patches)}"] if self.patches else [])
        return "-".join(parts)

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        return ("fc.",) if self.family == "torchvision" else ("classifier.",)


def backbone_names() -> list[str]:
    return [*TORCHVISION, *LITE_SIZES, "onnx:PATH[#output]"]


def get_spec(name: str, image_size: int | None = None, layers: tuple[str, ...] = (), tta: str | None = None,
             resize: str = "crop", decode: str = "exact", precision: str = "fp32",
             localize: bool = False) -> BackboneSpec:
    """Spec for a backbone name; ``image_size`` overrides the default input size; ``layers``, ``tta`` and
    ``resize`` choose how features are read (module names are checked when the backbone is built)."""
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if len(set(layers)) != len(layers) or any(not n for n in layers):
        raise ValueError(f"--layers must name distinct modules, got {','.join(layers)!r}")
    if localize and name not in PATCH_STAGES:
        raise ValueError(f"--localize needs a backbone whose stages are known ({', '.join(PATCH_STAGES)}), "
                         f"not {name}")
    if localize and tta is not None:
        raise ValueError("--localize maps the image as the network saw it: drop --tta")
    opts = {"layers": tuple(layers), "tta": tta, "resize": resize, "decode": decode, "precision": precision,
            "patches": PATCH_STAGES[name] if localize else ()}
    if name in TORCHVISION:
        return BackboneSpec(name, "torchvision", name, image_size or 224, IMAGENET_MEAN, IMAGENET_STD, **opts)
    if name in LITE_SIZES:
        arch = "tf_" + name
        return BackboneSpec(name, "timm", arch, image_size or LITE_SIZES[name], (0.5,) * 3, (0.5,) * 3, **opts)
    if name.startswith("onnx:"):
        if layers:
            raise ValueError("--layers needs a torchvision or timm backbone, not an ONNX model")
        path, _, output = name[5:].partition("#")
        return BackboneSpec(name, "onnx", path, image_size or 224, IMAGENET_MEAN, IMAGENET_STD, output or None,
                            **opts)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}")


def resolve_runtime(runtime: str, spec: BackboneSpec, gpu: bool) -> str:
    """The runtime an embedding actor uses: ``auto`` is ONNX Runtime for a torch backbone on CPU, torch on a
    GPU (fp16, channels_last); an ``onnx:`` backbone runs in ONNX Runtime, or OpenVINO when asked."""
    if spec.precision == "bf16":
        return "openvino"
    if spec.family == "onnx":
        return "openvino" if runtime == "openvino" else "onnxruntime"
    if runtime == "auto":
        return "torch" if gpu else "onnxruntime"
    return runtime


def runtime_version(name: str) -> str:
    """The version of the package that runs the network: recorded in ``run.json``."""
    from importlib.metadata import version

    return version(name)
