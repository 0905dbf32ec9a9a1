"""Pixels for the network, without torch: the resize + centre crop (or whole-image resize) of a backbone spec,
exactly as torchvision's ``Resize``/``CenterCrop`` do on PIL images, and one vectorised normalisation.

An ONNX Runtime embedding actor imports only this, PIL and numpy: no torch in its process.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from .specs import BackboneSpec

CROP_FRACTION = 0.875  # the crop is 87.5 % of the resized shorter side (ImageNet evaluation)
DRAFT_GAP = 2  # a reduced-scale JPEG decode keeps at least twice the resize's output size (PIL's reducing_gap)


def resize_size(spec: BackboneSpec, width: int, height: int) -> tuple[int, int]:
    """(width, height) the image is resized to before the centre crop: torchvision's ``Resize(int)`` of the
    shorter side, or the square input with ``resize="full"``."""
    size = spec.image_size
    if spec.resize == "full":
        return size, size
    short_target = int(round(size / CROP_FRACTION))
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_target, int(short_target * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_fn(spec: BackboneSpec) -> Callable[[Image.Image], np.ndarray]:
    """PIL RGB image → (H, W, 3) uint8 array: bilinear (antialiased) resize, then the centre crop; pixel for
    pixel what ``T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size)])`` gives (or ``T.Resize((size,
    size))`` with ``resize="full"``)."""
    size = spec.image_size

    def crop(img: Image.Image) -> np.ndarray:
        w, h = img.size
        tw, th = resize_size(spec, w, h)
        if (tw, th) != (w, h):
            img = img.resize((tw, th), Image.BILINEAR)
        if (tw, th) != (size, size):  # the resized image covers the crop on both sides
            top, left = int(round((th - size) / 2.0)), int(round((tw - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img)

    return crop


def draft_size(spec: BackboneSpec) -> Callable[[int, int], tuple[int, int]]:
    """For a reduced-scale JPEG decode (libjpeg's DCT scaling via PIL's ``draft``): the smallest (width,
    height) to decode an image of (width, height) to, ``DRAFT_GAP`` times its resize size."""
    def size(width: int, height: int) -> tuple[int, int]:
        tw, th = resize_size(spec, width, height)
        return DRAFT_GAP * tw, DRAFT_GAP * th

    return size


def normalize_batch(spec: BackboneSpec, pixels: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 → normalised (n, 3, H, W) float32, contiguous; elementwise in float32 as torchvision's
    ``ToTensor`` + ``Normalize`` (x / 255, minus mean, over std), so the same bits."""
    x = np.asarray(pixels).transpose(0, 3, 1, 2).astype(np.float32)
    x /= np.float32(255)
    x -= np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(x)
