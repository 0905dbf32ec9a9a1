"""The report's heatmaps: an anomaly map over its image, brought to the image's size as the score saw it
(``core.patches.map_to_image``), red where it approaches the threshold, with the peak marked."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from ..core.patches import map_to_image

HEATMAP_SIZE = 160


def heatmap_uri(data: bytes | None, grid: list[float], map_height: int, map_width: int, image_size: int,
                threshold: float, peak_xy: tuple[int, int] | None = None, size: int = HEATMAP_SIZE,
                border: list | None = None) -> str | None:
    """A PNG data URI of the image with its map overlaid (opacity rises from the map's minimum to the
    threshold, full above it); ``border``: the model's border calibration, so the map shown is the one scored
    against the threshold. None when the image cannot be decoded."""
    from ..vision.decode import DecodeError, decode_image

    try:
        img = decode_image(data)
    except DecodeError:
        return None
    full_w, full_h = img.size
    img.thumbnail((size, size))  # the map is drawn at the thumbnail's size: a 100 MP photo costs what a small one does
    m = map_to_image(np.asarray(grid, np.float64).reshape(map_height, map_width), img.height, img.width, image_size,
                     stats=border)
    lo = float(m.min())
    alpha = np.clip((m - lo) / max(threshold - lo, 1e-12), 0, 1) ** 2 * 0.7
    red = Image.new("RGB", img.size, (230, 30, 30))
    out = Image.composite(red, img, Image.fromarray((alpha * 255).astype(np.uint8), "L"))
    if peak_xy is not None and peak_xy[0] >= 0:
        r = max(3, min(out.size) // 30)
        x, y = (peak_xy[0] + 0.5) * out.width / full_w, (peak_xy[1] + 0.5) * out.height / full_h
        ImageDraw.Draw(out).ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 0), width=max(1, r // 2))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
