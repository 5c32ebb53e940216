"""`render_pair`: a pure function drawing a design twice, as a flat render and as its photographed twin,
aligned to within the fold displacement (at most 2.5 px at 256x256)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from r2r.training.data.designs import REFERENCE_SIDE, Design, Garment
from r2r.training.data.garments import _garment_mask_at, _in_polygon
from r2r.training.data.optics import _folds, _gaussian_blur, _linear_to_srgb, _shift, _srgb_to_linear, _to_uint8
from r2r.training.data.patterns import _palette, _pattern_index
from r2r.training.data.vocab import COLORS

# rendered: flat colours, hard edges, exactly the palette (what a 3D garment tool exports).
# real: the same design seen by a camera -- a small smooth fold displacement that warps the pattern,
# matching fold shading bands, lighting falloff, edge occlusion, a soft drop shadow on a lit near-white
# backdrop, slight blur, colour grading and sensor noise. The pattern, silhouette and seams are analytic
# functions of (u, v), so the real image evaluates them at displaced coordinates instead of resampling a
# raster, and stays aligned with its render: ground truth for texture preservation (SSIM, LPIPS).


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates of an image (possibly displaced) and how far they may be displaced."""

    u: np.ndarray  # (H, W) frame units
    v: np.ndarray
    width: int
    height: int
    slack: float  # max |displacement|, frame units

    @property
    def side(self) -> int:
        return min(self.width, self.height)

    def window(self, x0: float, y0: float, x1: float, y1: float, pad: float = 0.0) -> tuple[slice, slice]:
        """Rows, cols whose (displaced) coordinates can fall inside the box grown by `pad`."""
        s, grow = self.side, pad + self.slack + 2.0 / self.side
        c0 = max(0, math.floor((x0 - grow) * s + self.width / 2 - 0.5))
        c1 = min(self.width, math.ceil((x1 + grow) * s + self.width / 2 + 0.5))
        r0 = max(0, math.floor((y0 - grow) * s + self.height / 2 - 0.5))
        r1 = min(self.height, math.ceil((y1 + grow) * s + self.height / 2 + 0.5))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _base_grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    w, h = size
    s = min(w, h)
    u = ((np.arange(w, dtype=np.float32) + 0.5) - w / 2) / s
    v = ((np.arange(h, dtype=np.float32) + 0.5) - h / 2) / s
    return np.broadcast_to(u[None, :], (h, w)), np.broadcast_to(v[:, None], (h, w))


def _garment_mask(grid: _Grid, g: Garment) -> np.ndarray:
    mask = np.zeros(grid.u.shape, dtype=bool)
    rows, cols = grid.window(*g.bbox)
    mask[rows, cols] = _garment_mask_at(grid.u[rows, cols], grid.v[rows, cols], g)
    return mask


def _seam_mask(grid: _Grid, g: Garment, half_width: float, dash: float) -> np.ndarray:
    """Thin lines along the seams (dashed for topstitching), each computed in its own window."""
    out = np.zeros(grid.u.shape, dtype=bool)
    for line, dashed in zip(g.seams, g.dashed, strict=True):
        pts = np.array(line, dtype=np.float64)
        rows, cols = grid.window(*pts.min(axis=0), *pts.max(axis=0), pad=half_width)
        u, v = grid.u[rows, cols], grid.v[rows, cols]
        hit = np.zeros(u.shape, dtype=bool)
        along = 0.0
        for (xa, ya), (xb, yb) in itertools.pairwise(line):
            dx, dy = xb - xa, yb - ya
            length2 = dx * dx + dy * dy
            if length2 == 0:
                continue
            t = np.clip(((u - xa) * dx + (v - ya) * dy) / length2, 0.0, 1.0)
            ex, ey = u - (xa + t * dx), v - (ya + t * dy)
            near = ex * ex + ey * ey < half_width * half_width
            if dashed:
                pos = (along + t * math.sqrt(length2)) / dash
                near &= pos - np.floor(pos) < 0.6
            hit |= near
            along += math.sqrt(length2)
        out[rows, cols] |= hit
    return out


def _albedo(grid: _Grid, design: Design) -> tuple[np.ndarray, np.ndarray]:
    """Garment mask (H, W) and flat sRGB colours (H, W, 3) at the grid's coordinates."""
    g, p = design.garment, design.pattern
    s = grid.side
    mask = _garment_mask(grid, g)
    rows, cols = grid.window(*g.bbox)
    u, v = grid.u[rows, cols], grid.v[rows, cols]
    color = np.ones((*grid.u.shape, 3), dtype=np.float32)
    win = _palette(p)[_pattern_index(u, v, p)]
    shade = np.ones(u.shape, dtype=np.float32)
    for band, angle in g.ribs:
        inside = _in_polygon(u, v, band)
        rib_period = max(3.0 / s, 5.0 / REFERENCE_SIDE)
        t = (u * math.cos(angle) + v * math.sin(angle)) / rib_period
        shade[inside & (t - np.floor(t) < 0.45)] = 0.8
    half_width = max(0.5 / s, g.seam_width / 2)
    dash = max(3.0 / s, 5.0 / REFERENCE_SIDE)
    shade[_seam_mask(grid, g, half_width, dash)[rows, cols]] *= 0.55
    win = win * shade[..., None]
    for cx, cy, r in g.buttons:
        d2 = (u - cx) ** 2 + (v - cy) ** 2
        win[d2 < max(r, 1.5 / s) ** 2] = np.array(COLORS["charcoal"], np.float32) / 255
        win[(d2 < (0.45 * r) ** 2) & (r * s > 4)] = np.array(COLORS["grey"], np.float32) / 255
    color[rows, cols] = win
    color[~mask] = 1.0
    return mask, color


def render_pair(design: Design, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rendered, real) uint8 [H, W, 3] for `size` = (W, H); the real image is aligned with the render."""
    width, height = size
    s = min(width, height)
    photo = design.photo
    u0, v0 = _base_grid(size)

    _, flat = _albedo(_Grid(u0, v0, width, height, 0.0), design)
    rendered = _to_uint8(flat)

    du, dv, slope = _folds(u0, v0, photo)
    warped = _Grid(u0 + du, v0 + dv, width, height, photo.fold_displacement)
    mask, albedo = _albedo(warped, design)
    m = mask.astype(np.float32)

    # lighting: falloff from a light above the garment, fold bands, occlusion towards the silhouette
    dist = np.sqrt((u0 - photo.light_pos[0]) ** 2 + (v0 - photo.light_pos[1]) ** 2)
    light = 1.0 - photo.light_falloff * np.minimum(dist, 1.2) / 1.2
    folds = 1.0 + photo.fold_shading * slope
    occlusion = 1.0 - photo.edge_occlusion * np.clip(2 * (1 - _gaussian_blur(m, 3.0 * s / REFERENCE_SIDE)), 0, 1)
    garment = _srgb_to_linear(albedo) * (light * folds * occlusion)[..., None]

    # backdrop: off-white with a vignette and the garment's soft drop shadow
    sdx = round(photo.shadow_offset[0] * s)
    sdy = round(photo.shadow_offset[1] * s)
    shadow = _gaussian_blur(_shift(m, sdx, sdy, 0.0), photo.shadow_sigma * s)
    vignette = 1.0 - photo.vignette * (u0 * u0 + v0 * v0)
    back = (vignette * (1.0 - photo.shadow_strength * shadow))[..., None] * np.asarray(
        photo.background, dtype=np.float32
    )
    img = np.where(mask[..., None], garment, back)
    img = _linear_to_srgb(_gaussian_blur(img, photo.blur_sigma * s))

    # grading: desaturate, S-curve, white balance, lifted blacks
    luma = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]  # no BLAS: one core, exact
    img = luma[..., None] + photo.saturation * (img - luma[..., None])
    img = np.clip(img, 0.0, 1.0)
    img = img + photo.contrast * (img * img * (3 - 2 * img) - img)
    img = img * np.asarray(photo.gains, dtype=np.float32)
    img = photo.black_level + (1 - photo.black_level) * img

    # sensor noise: signal-dependent luminance noise plus some per-channel (chroma) noise
    rng = np.random.default_rng(photo.noise_seed)
    sigma = photo.noise_sigma * (0.6 + 0.6 * np.sqrt(np.clip(img, 0, 1)))
    lum_noise = rng.standard_normal((height, width, 1), dtype=np.float32)
    chroma = rng.standard_normal((height, width, 3), dtype=np.float32)
    mix = photo.chroma_noise
    img = img + sigma * ((1 - mix) * lum_noise + mix * chroma)
    return rendered, _to_uint8(img)
