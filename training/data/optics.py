"""Photographic effects on float images: Gaussian blur, shifts, the fold displacement field and its
shading slope, and sRGB <-> linear / uint8 conversion."""

from __future__ import annotations

import math

import numpy as np

from r2r.training.data.designs import Photo


def _blur_axis_kernel(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.zeros_like(a)
    for j, w in enumerate(k):
        out += w * np.take(p, np.arange(j, j + n), axis=axis)
    return out


def _box_axis(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    r = width // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(width, width + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / width).astype(np.float32)


def _gaussian_blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian over the first two axes: exact kernel when small, three box passes when large."""
    if sigma_px < 0.3:
        return a
    if sigma_px <= 3.0:
        return _blur_axis_kernel(_blur_axis_kernel(a, sigma_px, 0), sigma_px, 1)
    n = 3
    ideal = math.sqrt(12 * sigma_px**2 / n + 1)
    lo = math.floor(ideal) - (1 - math.floor(ideal) % 2)
    m = round((12 * sigma_px**2 - n * lo * lo - 4 * n * lo - 3 * n) / (-4 * lo - 4))
    for k in range(n):
        width = lo if k < m else lo + 2
        a = _box_axis(_box_axis(a, width, 0), width, 1)
    return a


def _shift(a: np.ndarray, dx: int, dy: int, fill: float) -> np.ndarray:
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _folds(u: np.ndarray, v: np.ndarray, photo: Photo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Displacement (du, dv), |d| <= fold_displacement, and the fold slope in [-1, 1] for shading."""
    du = np.zeros(u.shape, np.float32)
    dv = np.zeros(u.shape, np.float32)
    slope = np.zeros(u.shape, np.float32)
    for f in photo.folds:
        c, s = math.cos(f.angle), math.sin(f.angle)
        x, y = u - f.center[0], v - f.center[1]
        env = f.weight * np.exp(-(x * x + y * y) / (2 * f.radius**2))
        t = (x * c + y * s) * (2 * math.pi / f.wavelength) + f.phase
        h = env * np.sin(t)
        du += h * c
        dv += h * s
        slope += env * np.cos(t)
    # overlapping folds may add up: clamp the magnitude, so alignment with the render is guaranteed
    scale = np.float32(photo.fold_displacement) / np.maximum(np.sqrt(du * du + dv * dv), np.float32(1))
    return du * scale, dv * scale, np.clip(slope, -1, 1)


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.power(x, 2.2, dtype=np.float32)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    return np.power(np.clip(x, 0.0, 1.0), 1 / 2.2, dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
