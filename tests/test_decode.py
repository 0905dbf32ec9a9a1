"""Every odd input becomes an RGB image or a DecodeError with a specific reason."""
import io
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


@pytest.mark.unit
def test_the_torch_free_crop_and_normalisation_are_torchvisions_pixel_for_pixel():
    """The actors' resize + centre crop and normalisation (``vision.preprocess``) against torchvision's
    transforms, on shapes that stress the rounding: tiny, thin, square, odd, both orientations."""
    from torchvision import transforms as T

    from dnnad.vision.preprocess import crop_fn, normalize_batch
    from dnnad.vision.specs import get_spec

    rng = np.random.default_rng(0)
    shapes = [(32, 32), (373, 248), (246, 196), (1, 1), (5, 900), (900, 5), (297, 297), (301, 401), (37, 38)]
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in shapes]
    bilinear = T.InterpolationMode.BILINEAR
    for spec in (get_spec("resnet18", 32), get_spec("efficientnet_lite2", 260), get_spec("resnet18", 37),
                 get_spec("resnet18", 224, resize="full")):
        size = spec.image_size
        ref = T.Compose([T.Resize((size, size), interpolation=bilinear)] if spec.resize == "full" else
                        [T.Resize(int(round(size / 0.875)), interpolation=bilinear), T.CenterCrop(size)])
        norm = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
        crop = crop_fn(spec)
        for img in images:
            pixels = crop(img)
            np.testing.assert_array_equal(pixels, np.asarray(ref(img)))
            np.testing.assert_array_equal(normalize_batch(spec, pixels[None])[0], norm(ref(img)).numpy())


@pytest.mark.unit
def test_a_reduced_decode_keeps_twice_the_resize_size_and_the_pixels_close():
    """``--decode reduced``: a 12 MP photo is decoded at 1/4 scale for a 260 px crop (still at least twice the
    297 px resize), turned by its EXIF orientation like the exact decode; the crop differs by a few levels."""
    from dnnad.vision.preprocess import crop_fn, draft_size
    from dnnad.vision.specs import get_spec

    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).resize((4000, 3000), Image.BICUBIC)
    spec = get_spec("efficientnet_lite2", 260, decode="reduced")
    crop = crop_fn(spec)
    for orientation, shown in ((1, (4000, 3000)), (6, (3000, 4000))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        exact = decode_image(buf.getvalue())
        reduced = decode_image(buf.getvalue(), draft=draft_size(spec))
        assert exact.size == shown and reduced.size == (shown[0] // 4, shown[1] // 4)
        need = draft_size(spec)(*shown)
        assert reduced.size[0] >= need[0] and reduced.size[1] >= need[1]
        diff = np.abs(crop(exact).astype(int) - crop(reduced).astype(int))
        assert diff.mean() < 2 and diff.max() <= 16, (diff.mean(), diff.max())
    small = decode_image(jpeg_bytes(Image.new("RGB", (400, 300), "red")), draft=draft_size(spec))
    assert small.size == (400, 300)  # no smaller than needed: decoded whole
