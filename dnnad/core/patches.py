"""Patch-level nearest neighbours (SPADE / PatchCore): anomaly maps from a memory bank of normal patches.

A patch grid ``(h, w, d)`` per image (``vision.patches``); each query patch's distance to its nearest normal
patch is the anomaly map ``(h, w)``. ``smooth_map`` brings a map to the network's input resolution
(bilinear, then a Gaussian of ``SIGMA`` pixels, as PatchCore does). The image score is the maximum of the
smoothed map after border calibration (``calibrate_map``: each ring of cells by its distance from the edge
standardised against the normal images' leave-one-image-out maps), which keeps padding artefacts at the
edge from outscoring a defect. ``map_to_image`` brings a map to an image's own size exactly as the score
saw it. ``greedy_coreset`` is PatchCore's k-centre subsampling on a random projection, run per image and
then in independent chunks so it is linear in the number of patches, parallel and bounded in memory.
Numpy, SciPy and FAISS only.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .arrays import as_float32

SIGMA = 4.0  # Gaussian blur of the map at input resolution, pixels (PatchCore's)
CORESET_DIM = 128  # random projection the k-centre distances are taken in (PatchCore's)
CORESET_CHUNK = 65_536  # patches one greedy pass covers: its distance vector stays in cache
PRESELECT = 10  # each image's own pre-selection keeps this many times the coreset's fraction
# Border calibration: cells this far (or farther) from the grid's edge form the interior ring. Padding makes
# edge patches of normal images match less well, so an uncalibrated maximum sits on the border (every free
# MTD test tile peaked within 16 px of it); each ring's normal distances are standardised to the interior's.
BORDER_RINGS = 6


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights with half-pixel centres (``align_corners=False``, as
    torch's ``interpolate`` and OpenCV's ``resize`` place them)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    W = np.zeros((n_out, n_in))
    W[np.arange(n_out), lo] += 1 - frac
    W[np.arange(n_out), hi] += frac
    return W


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map (..., h, w) resized bilinearly to (..., height, width), float64."""
    m = np.asarray(m, dtype=np.float64)
    return resize_matrix(m.shape[-2], height) @ m @ resize_matrix(m.shape[-1], width).T


def resize_axis(m: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """``m`` brought to ``n_out`` along ``axis``: bilinear (``resize_matrix``) where that grows it; where it
    shrinks it, each output pixel is the maximum of the input pixels its footprint starts, so every input pixel
    counts once and a narrow peak keeps its value and place instead of falling between samples. A pixel
    belongs to the output pixel its centre falls in, as in ``peak``."""
    n_in = m.shape[axis]
    if n_out >= n_in:
        return np.moveaxis(np.tensordot(resize_matrix(n_in, n_out), np.moveaxis(m, axis, 0), axes=1), 0, axis)
    starts = np.maximum(-((n_out - 2 * np.arange(n_out) * n_in) // (2 * n_out)), 0)  # ceil(j * n_in / n_out - 1/2)
    return np.maximum.reduceat(m, starts, axis=axis)


def smooth_map(grid: np.ndarray, size: int, sigma: float = SIGMA) -> np.ndarray:
    """Patch map(s) (..., h, w) → (..., size, size) at the network's input resolution: bilinear, then a
    Gaussian blur of ``sigma`` pixels (per map)."""
    up = resize_map(grid, size, size)
    axes = (up.ndim - 2, up.ndim - 1)
    return gaussian_filter(up, sigma=sigma, axes=axes, mode="nearest") if sigma > 0 else up


def ring_index(h: int, w: int, rings: int = BORDER_RINGS) -> np.ndarray:
    """(h, w) int: each cell's distance in cells from the grid's nearest edge, capped at ``rings``."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x)).clip(max=rings)


def border_calibration(maps: np.ndarray, rings: int = BORDER_RINGS) -> np.ndarray:
    """(2, rings + 1) float64: mean and standard deviation of normal maps' (n, h, w) values on each ring
    (``ring_index``; leave-one-image-out maps, so they are what a new normal image would get). A ring the
    grid lacks (a small grid) takes the innermost present ring's statistics."""
    maps = np.asarray(maps, dtype=np.float64)
    r = ring_index(maps.shape[-2], maps.shape[-1], rings)
    stats = np.full((2, rings + 1), np.nan)
    for i in range(rings + 1):
        v = maps[..., r == i]
        if v.size:
            stats[:, i] = v.mean(), max(float(v.std()), 1e-12)
    top = int(r.max())
    stats[:, top + 1:] = stats[:, top:top + 1]
    return stats


def calibrate_map(grid: np.ndarray, stats: np.ndarray | None) -> np.ndarray:
    """Map(s) (..., h, w) with each ring's values standardised by ``stats`` (``border_calibration``) and put
    back on the interior ring's scale: (v - mean_r) / std_r * std_in + mean_in; unchanged for None."""
    grid = np.asarray(grid, dtype=np.float64)
    if stats is None:
        return grid
    stats = np.asarray(stats, dtype=np.float64)
    r = ring_index(grid.shape[-2], grid.shape[-1], stats.shape[1] - 1)
    mean, std = stats[0][r], stats[1][r]
    return (grid - mean) / std * stats[1, -1] + stats[0, -1]


def score_map(grid: np.ndarray, image_size: int, stats: np.ndarray | None = None, sigma: float = SIGMA) -> np.ndarray:
    """The map a row's ``score`` and peak come from, (image_size, image_size): the border-calibrated grid
    (``calibrate_map``) smoothed (``smooth_map``). Its maximum is the score."""
    return smooth_map(calibrate_map(grid, stats), image_size, sigma)


def map_to_image(grid: np.ndarray, height: int, width: int, image_size: int, sigma: float = SIGMA,
                 stats: np.ndarray | None = None) -> np.ndarray:
    """An ``anomaly_map`` over an image of ``height`` x ``width`` pixels (the output's ``image_height``,
    ``image_width``) that the network saw whole at ``image_size`` (``--resize full``): smoothed as the score
    was (``smooth_map``), then brought to the image (``resize_axis``: bilinear on a side longer than
    ``image_size``, the maximum over each pixel's footprint on a shorter one). ``grid`` is (h, w): the
    output's flat ``anomaly_map`` reshaped to (``map_height``, ``map_width``). With the model's border
    ``stats`` it is the map the score and peak came from: its maximum is the row's ``score`` (exactly where
    the image is no larger than the input, up to the bilinear interpolation where it is larger). Without
    ``stats``, the smoothed distances themselves."""
    m = score_map(grid, image_size, stats, sigma)
    return resize_axis(resize_axis(m, int(height), m.ndim - 2), int(width), m.ndim - 1)  # int: pandas gives floats


def peak(smoothed: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """(x, y) of a smoothed map's (size, size) maximum, in the pixels of a ``width`` x ``height`` image."""
    size_y, size_x = smoothed.shape
    y, x = np.unravel_index(int(np.argmax(smoothed)), smoothed.shape)
    return int((2 * x + 1) * width // (2 * size_x)), int((2 * y + 1) * height // (2 * size_y))  # its centre's pixel


def coreset_size(n: int, fraction: float | None) -> int:
    """Patches kept by a coreset of ``fraction`` (None or 1: all), at least one."""
    return n if fraction is None or fraction >= 1 else max(1, int(round(n * fraction)))


def coreset_projection(d: int, dim: int = CORESET_DIM, seed: int = 0) -> np.ndarray | None:
    """The Gaussian random projection (d, dim) float32 the k-centre distances are taken in (None: d <= dim)."""
    if d <= dim:
        return None
    return np.random.default_rng(seed).standard_normal((d, dim)).astype(np.float32)


def coreset_chunks(n_images: int, per_image: int, chunk: int = CORESET_CHUNK) -> list[tuple[int, int]]:
    """[start, stop) image ranges of about ``chunk`` patches each (whole images, at least one)."""
    step = max(1, chunk // max(1, per_image))
    return [(a, min(n_images, a + step)) for a in range(0, n_images, step)]


def preselect_size(m: int, fraction: float) -> int:
    """How many of an image's ``m`` patches ``preselect`` keeps."""
    return coreset_size(m, PRESELECT * fraction)


def preselect(patches: np.ndarray, fraction: float, projection: np.ndarray | None) -> np.ndarray:
    """Sorted positions of one image's patches (m, d) that its own k-centre pre-selection keeps:
    ``PRESELECT * fraction`` of them (all from a fraction of 1 / PRESELECT up)."""
    f = PRESELECT * fraction
    return np.arange(len(patches)) if f >= 1 else coreset_chunk(as_float32(patches), f, projection)


def select_chunks(S: np.ndarray, per_image: int, fraction: float, projection: np.ndarray | None) -> np.ndarray:
    """Sorted positions of a k-centre selection of ``fraction`` of the rows of ``S`` (whole images of
    ``per_image`` rows, image-major), chunk by chunk (``coreset_chunks``)."""
    return np.concatenate([a * per_image + coreset_chunk(S[a * per_image:b * per_image], fraction, projection)
                           for a, b in coreset_chunks(len(S) // per_image, per_image)])


def greedy_coreset(X: np.ndarray, fraction: float, per_image: int = 1, seed: int = 0) -> np.ndarray:
    """Sorted row positions of a k-centre coreset keeping ``fraction`` of the rows of ``X`` (n, d), the rows
    of consecutive images (``per_image`` rows each).

    PatchCore's greedy selection (each step takes the row farthest from those taken) in a Gaussian random
    projection to ``CORESET_DIM`` dimensions, made linear and parallel in two independent stages (composable
    coresets): each image first keeps ``PRESELECT * fraction`` of its own patches (``preselect``: where the
    job's embedding actors stream), then chunks of whole images of about ``CORESET_CHUNK`` survivors each
    keep ``fraction`` of the total (``select_chunks``: parallel tasks). Time O(n * fraction * (per_image +
    chunk) * dim) instead of O(n^2 * fraction * dim); memory: the survivors, ``PRESELECT * fraction`` of the
    patches. The job runs the same two stages and gets the same rows."""
    X = as_float32(X)
    if fraction >= 1:
        return np.arange(len(X))
    P = coreset_projection(X.shape[1], seed=seed)
    n_images = len(X) // per_image
    pre = np.concatenate([i * per_image + preselect(X[i * per_image:(i + 1) * per_image], fraction, P)
                          for i in range(n_images)])
    kept = len(pre) // n_images
    return pre[select_chunks(X[pre], kept, coreset_size(len(X), fraction) / len(pre), P)]


def coreset_chunk(X: np.ndarray, fraction: float, projection: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-centre positions (sorted) within one chunk, ``coreset_size(len(X), fraction)`` of them; the
    first centre is row 0, so the result depends on nothing but the chunk."""
    Z = X @ projection if projection is not None else np.array(X, dtype=np.float32)
    sq = np.einsum("ij,ij->i", Z, Z)
    m = coreset_size(len(Z), fraction)
    chosen = np.empty(m, dtype=np.int64)
    chosen[0] = 0
    best = sq + sq[0] - 2 * (Z @ Z[0])
    for i in range(1, m):
        j = int(np.argmax(best))
        chosen[i] = j
        np.minimum(best, sq + sq[j] - 2 * (Z @ Z[j]), out=best)
    return np.sort(chosen)
