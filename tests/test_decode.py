"""Every odd input becomes an RGB image or a DecodeError with a specific reason."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dnnad.vision.decode import DecodeError, decode_image
from tests.helpers import png_bytes

pytestmark = pytest.mark.unit


def declared_size_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's signature)."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def jpeg_bytes(img, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("data,reason", [
    (None, "null image bytes"),
    (b"", "empty file"),
    (b"hello, I am text with a .png name", "not an image"),
    (declared_size_png(20000, 20000), "decompression bomb"),
    (jpeg_bytes(Image.new("RGB", (64, 64), "red"))[:200], "truncated or corrupt"),
    (png_bytes(Image.new("RGB", (64, 64), "red"))[:80], "truncated or corrupt"),
])
def test_bad_inputs_give_specific_reasons(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


@pytest.mark.parametrize("img", [
    Image.new("RGB", (1, 1), "blue"),
    Image.new("L", (10, 7), 128),
    Image.new("LA", (10, 7)),
    Image.new("RGBA", (10, 7), (1, 2, 3, 4)),
    Image.new("P", (10, 7)),
    Image.fromarray(np.full((6, 5), 40000, dtype=np.uint16)),  # 16-bit grayscale
])
def test_odd_modes_are_converted_to_rgb(img):
    out = decode_image(png_bytes(img))
    assert out.mode == "RGB" and out.size == img.size


def test_cmyk_jpeg_and_16_bit_scaling():
    assert decode_image(jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 0, 0)))).mode == "RGB"
    sixteen = decode_image(png_bytes(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))))
    assert np.asarray(sixteen).min() == 255  # full-scale 16-bit white stays white
