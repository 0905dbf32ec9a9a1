"""Bytes → RGB PIL image, or a DecodeError whose message is the row's error reason."""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # decompression-bomb guard: ~10k x 10k
EXIF_ORIENTATION = 0x0112  # 1 = as stored; 2-8 = mirrored and/or turned
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


class DecodeError(Exception):
    """An input that cannot become an image; ``str(e)`` is the reason written to the output row."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS,
                 draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode encoded image bytes to RGB as a viewer shows them: turned by their EXIF orientation (camera and
    phone photos), grayscale, 16-bit, palette, CMYK and alpha converted.

    ``draft``: (width, height) as shown → the smallest size needed; a JPEG is then decoded at the largest
    DCT scale (1/2, 1/4, 1/8) that still covers it, skipping most of a large photo's decoding work."""
    if data is None:
        raise DecodeError("null image bytes")
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"decompression bomb guard: {w}x{h} pixels exceeds {max_pixels}")
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            if draft is not None and img.format == "JPEG":
                turned = orientation in TRANSPOSED
                tw, th = draft(*((h, w) if turned else (w, h)))
                img.draft(None, (th, tw) if turned else (tw, th))
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image: unrecognised format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"truncated or corrupt image: {e}") from None
