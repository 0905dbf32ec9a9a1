"""Bytes → RGB PIL image, or a DecodeError whose message is the row's error reason."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # decompression-bomb guard: ~10k x 10k
EXIF_ORIENTATION = 0x0112  # 1 = as stored; 2-8 = mirrored and/or turned


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


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to RGB as a viewer shows them: turned by their EXIF orientation (camera and
    phone photos), grayscale, 16-bit, palette, CMYK and alpha converted."""
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
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
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
