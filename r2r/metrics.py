"""Image metrics shared by the evaluation, the benchmarks and the tests (uint8 or float arrays).

SSIM is the standard one of Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, data range 255, computed on each RGB channel over the valid (unpadded) region, and the mean
of the three channels' mean SSIM maps is reported. PSNR is 10 log10(255^2 / MSE) over all pixels and
channels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_window", "psnr", "ssim"]




def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (SSIM's window is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of [H, W] with the Gaussian (MATLAB filter2(..., 'valid'))."""
    k = len(g)
    h, w = img.shape
    rows = sum(g[i] * img[:, i : w - k + 1 + i] for i in range(k))
    return sum(g[i] * rows[i : h - k + 1 + i, :] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two images ([H, W] or [H, W, C], same shape), averaged over channels."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[:2]) < size:
        raise ValueError(f"ssim: images of {a.shape[:2]} are smaller than the {size}x{size} window")
    g = gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _filter_valid(x, g), _filter_valid(y, g)
        sxx = _filter_valid(x * x, g) - mx * mx
        syy = _filter_valid(y * y, g) - my * my
        sxy = _filter_valid(x * y, g) - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx * mx + my * my + c1) * (sxx + syy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """10 log10(range^2 / MSE); inf for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))
