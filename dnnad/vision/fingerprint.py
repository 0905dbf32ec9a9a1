"""A picture's low-level fingerprint for near-duplicate verification: its grey levels on a 32 x 32 grid after
uniform borders are trimmed. ``core.duplicates`` compares two of them band-passed and aligned (small
rotations, zooms, shifts, a mirror), so re-encoding, resizing, tone changes, frames, crops and small rotations
leave a copy's fingerprint matching, while two distinct photos that a semantic embedding puts side by side
rarely share its detail."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageChops

FINGERPRINT_SIZE = 32  # grid side: 1,024 grey levels per image
BORDER_TOLERANCE = 24  # grey-level difference from the corner colour still counted as border
TRIM_PASSES = 2  # an added frame, then the picture's own plain background


def trim_borders(img: Image.Image, tolerance: int = BORDER_TOLERANCE, passes: int = TRIM_PASSES) -> Image.Image:
    """``img`` without uniform margins of its top-left corner's colour (at most ``passes`` times)."""
    for _ in range(passes):
        bg = Image.new(img.mode, img.size, img.getpixel((0, 0)))
        box = ImageChops.difference(img, bg).convert("L").point(lambda v: 255 if v > tolerance else 0).getbbox()
        if not box or box == (0, 0, *img.size):
            break
        img = img.crop(box)
    return img


def fingerprint(img: Image.Image, size: int = FINGERPRINT_SIZE) -> np.ndarray:
    """(size * size,) uint8: the trimmed image's grey levels, box-averaged onto a size x size grid."""
    grey = trim_borders(img.convert("RGB")).convert("L")
    return np.asarray(grey.resize((size, size), Image.BOX), dtype=np.uint8).ravel()
