"""Procedural paired dataset for FashionR2R: flat-shaded garment renders and their "photographed" twins.

Each design (a garment silhouette, a repeating pattern and a palette) is drawn twice on a white backdrop:

* rendered: flat colours, hard edges, exactly the palette (what a 3D garment tool exports);
* real: the same design seen by a camera -- a small smooth fold displacement that warps the pattern,
  matching fold shading bands, lighting falloff, edge occlusion, a soft drop shadow on a lit
  near-white backdrop, slight blur, colour grading and sensor noise.

The gap between the domains is where the gap between a garment tool's export and a studio photo is:
shading, folds, shadows and optics, on the same white sweep. (Generator version 1 also tinted the
photo's backdrop grey, 0.84-0.96 linear: a flat, image-wide level that a denoiser reads straight off
its noisy input at the method's strength 0.3, so no img2img method at that strength moves it, and a
realism score keyed on it measured the backdrop, not the translation.)

The fold displacement is at most a few pixels (2.5 px at 256x256), so the real image stays aligned
with its render and serves as ground truth for texture preservation (SSIM, LPIPS) on the test split.
Patterns repeat every 8-24 px at 256x256 (one to three latent cells), fine enough that blurring
them away is measurable.

Everything is vectorized numpy evaluated on coordinate grids: the pattern, silhouette and seams are
analytic functions of (u, v), so the real image is drawn by evaluating them at displaced coordinates
instead of resampling a raster. Image i of a dataset depends only on (seed, i).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r2r.atomic import atomic_dir
from r2r.imageio import save_png

GENERATOR_VERSION = 2
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 32, 4096, 8
REFERENCE_SIDE = 256  # pattern periods, blur radii etc. are specified in pixels at this short side
DOMAINS = ("rendered", "real")
SPLITS = ("train", "test")

Point = tuple[float, float]
Polygon = tuple[Point, ...]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

# sRGB of the named colours; names are the caption words.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (247, 247, 244),
    "cream": (243, 232, 200),
    "grey": (128, 130, 134),
    "charcoal": (62, 64, 70),
    "navy": (24, 38, 96),
    "blue": (32, 92, 204),
    "teal": (0, 128, 128),
    "mint": (150, 224, 190),
    "green": (32, 140, 62),
    "olive": (112, 116, 40),
    "yellow": (250, 212, 40),
    "mustard": (206, 160, 30),
    "orange": (246, 128, 24),
    "coral": (248, 118, 96),
    "red": (204, 32, 42),
    "burgundy": (122, 22, 48),
    "pink": (240, 122, 172),
    "lavender": (186, 160, 226),
    "purple": (112, 50, 152),
    "brown": (112, 70, 40),
    "beige": (216, 196, 156),
}
# Garment kind -> caption noun phrase.
GARMENTS: dict[str, str] = {
    "tshirt": "tshirt",
    "tank_top": "tank top",
    "sweater": "sweater",
    "jacket": "jacket",
    "coat": "coat",
    "dress": "dress",
    "skirt": "skirt",
    "trousers": "trousers",
    "shorts": "shorts",
}
PLURAL_GARMENTS = frozenset({"trousers", "shorts"})  # captioned as "a pair of ..."
PATTERNS = ("solid", "stripes", "zigzag", "checked", "gingham", "plaid", "dots", "motif", "lettering")
MOTIFS = ("diamond", "cross", "ring", "triangle", "heart", "floral")
_PATTERN_WORDS = ("plain", "striped", "zigzag", "checked", "gingham", "plaid", "polka", "dots", "lettering")
_GLUE_WORDS = ("a", "an", "and", "with", "small", "print", "pair", "of")

# Every word a caption may contain (captions are lowercase words separated by single spaces).
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            *COLORS,
            *(w for phrase in GARMENTS.values() for w in phrase.split()),
            *_PATTERN_WORDS,
            *MOTIFS,
            *_GLUE_WORDS,
        }
    )
)

# Pattern repeat range in pixels at the reference side, and the smallest repeat in actual pixels
# that still draws the pattern legibly (small images get coarser, never aliased, patterns).
# The shortest repeat is the VAE's latent cell (8 px): finer repeats cannot survive a small 8x SD-1.x
# autoencoder, so they would measure the autoencoder, not the method (generator version 1
# drew 3-16 px and its lettering and stripes came back from the tiny VAE as a blur).
_PERIOD_PX: dict[str, tuple[float, float, float]] = {
    "solid": (8.0, 12.0, 4.0),  # unused by the drawing (plain colour), kept so every kind has a period
    "stripes": (8.0, 20.0, 4.0),
    "zigzag": (10.0, 20.0, 5.0),
    "checked": (8.0, 20.0, 4.0),
    "gingham": (8.0, 20.0, 4.0),
    "plaid": (14.0, 24.0, 8.0),
    "dots": (10.0, 22.0, 5.0),
    "motif": (12.0, 22.0, 7.0),
    "lettering": (11.0, 18.0, 7.0),
}

# 3x5 bitmap glyphs for the lettering pattern: A C E F H L N O P R S T U.
_FONT = np.array(
    [
        [[int(c) for c in row] for row in glyph.split()]
        for glyph in (
            "010 101 111 101 101", "011 100 100 100 011", "111 100 110 100 111", "111 100 110 100 100",
            "101 101 111 101 101", "100 100 100 100 111", "110 101 101 101 101", "010 101 101 101 010",
            "110 101 110 100 100", "110 101 110 101 101", "011 100 010 001 110", "111 010 010 010 010",
            "101 101 101 101 111",
        )
    ],
    dtype=bool,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Design
# --------------------------------------------------------------------------------------------------
# Lengths are in "frame units": the image's short side is 1 and (0, 0) is the image centre, x right,
# y down. A design therefore renders at any size; `sample_design` only uses the size to keep the
# pattern repeat above a legible number of pixels.


@dataclass(frozen=True)
class Garment:
    """Silhouette and construction details, already placed in the frame."""

    kind: str  # a key of GARMENTS
    polygons: tuple[Polygon, ...]  # union of these is the garment
    holes: tuple[Polygon, ...]  # cut out of the union (V necks)
    ellipse_holes: tuple[tuple[float, float, float, float], ...]  # (cx, cy, rx, ry): round necks
    seams: tuple[Polygon, ...]  # open polylines drawn as thin darker lines
    dashed: tuple[bool, ...]  # per seam: topstitching (dashed) or a sewn seam (solid)
    ribs: tuple[tuple[Polygon, float], ...]  # ribbed bands (region, rib angle in radians)
    buttons: tuple[tuple[float, float, float], ...]  # (cx, cy, r)
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the silhouette
    seam_width: float  # line width, frame units


@dataclass(frozen=True)
class Pattern:
    """A fine repeating pattern: which kind, its colours (names, dominant first) and its geometry."""

    kind: str  # one of PATTERNS
    colors: tuple[str, ...]
    motif: str  # one of MOTIFS for kind == "motif", else ""
    period: float  # repeat, frame units
    angle: float  # radians
    phase: tuple[float, float]  # offset, in periods
    duty: float  # stripe / dot / motif size as a fraction of the period
    bands: tuple[float, ...]  # stripe and plaid band widths (fractions of the period, sum 1)
    band_colors: tuple[int, ...]  # index into `colors` per band
    stagger: bool  # dots and motifs: half-drop rows
    glyph_seed: int  # lettering: which glyphs go where


@dataclass(frozen=True)
class Fold:
    """One localized fold: sinusoidal ridges across `angle`, under a Gaussian envelope."""

    angle: float
    wavelength: float
    phase: float
    center: Point
    radius: float
    weight: float


@dataclass(frozen=True)
class Photo:
    """How the real domain differs from the render: geometry, lighting, optics, grading and noise."""

    folds: tuple[Fold, ...]
    fold_displacement: float  # max displacement, frame units
    fold_shading: float  # amplitude of the fold shading bands
    light_pos: Point
    light_falloff: float
    edge_occlusion: float
    shadow_offset: Point
    shadow_sigma: float
    shadow_strength: float
    background: tuple[float, float, float]  # linear-light backdrop colour
    vignette: float
    blur_sigma: float  # frame units
    saturation: float
    contrast: float  # S-curve strength, 0 = identity
    gains: tuple[float, float, float]
    black_level: float
    noise_sigma: float  # in [0, 1] units of the 8-bit range
    chroma_noise: float  # fraction of the noise that is per-channel
    noise_seed: int


@dataclass(frozen=True)
class Design:
    """All sampled parameters of one dataset item; `render_pair` is a pure function of it."""

    garment: Garment
    pattern: Pattern
    photo: Photo


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _mirror(points: Sequence[Point]) -> list[Point]:
    return [(-x, y) for x, y in points]


def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int) -> list[Point]:
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(t0, t1, n, dtype=np.float64).tolist()]


@dataclass
class _Shape:
    """Mutable builder for a garment in its unit frame (height 1, y in [-0.5, 0.5], centred on x = 0)."""

    polygons: list[list[Point]]
    holes: list[list[Point]]
    ellipse_holes: list[tuple[float, float, float, float]]
    seams: list[list[Point]]
    dashed: list[bool]
    ribs: list[tuple[list[Point], float]]
    buttons: list[tuple[float, float, float]]

    @classmethod
    def empty(cls) -> _Shape:
        return cls([], [], [], [], [], [], [])

    def seam(self, points: Sequence[Point], dashed: bool = False) -> None:
        self.seams.append(list(points))
        self.dashed.append(dashed)


def _sleeve(
    root: Point, depth: float, angle: float, length: float, end_width: float
) -> tuple[list[Point], Point, Point]:
    """Right sleeve hanging from the armhole (root -> root + depth down) at `angle` below horizontal."""
    d = (math.cos(angle), math.sin(angle))
    p = (-math.sin(angle), math.cos(angle))
    e1 = (root[0] + d[0] * length, root[1] + d[1] * length)
    e2 = (e1[0] + p[0] * end_width, e1[1] + p[1] * end_width)
    armpit = (root[0], root[1] + depth)
    return [root, e1, e2, armpit], e1, e2


def _top(rng: np.random.Generator, kind: str) -> _Shape:
    """T-shirt, sweater, jacket and coat: a body with two sleeves, a neck opening and details."""
    sh = _Shape.empty()
    long = kind in ("sweater", "jacket", "coat")
    if kind == "coat":
        w, hem = _u(rng, 0.46, 0.56), _u(rng, 1.05, 1.2)
    else:
        w, hem = _u(rng, 0.58, 0.74), _u(rng, 0.94, 1.06)
    drop = _u(rng, 0.035, 0.07)
    if long:
        angle, length = math.radians(_u(rng, 55, 68)), _u(rng, 0.42, 0.55) * (0.85 if kind == "coat" else 1)
        width = _u(rng, 0.12, 0.16)
    else:
        angle, length, width = math.radians(_u(rng, 20, 38)), _u(rng, 0.15, 0.24), _u(rng, 0.15, 0.2)
    nw = _u(rng, 0.18, 0.26) * w / 0.66
    top = -0.5
    shoulder = (w / 2, top + drop)
    depth = width / math.cos(angle)
    sleeve, e1, e2 = _sleeve(shoulder, depth, angle, length, width * _u(rng, 0.75, 0.95))
    armpit = sleeve[3]
    hw = w * hem / 2
    body_right = [(nw / 2, top), shoulder, armpit, (hw, 0.5)]
    body = [*body_right, *reversed(_mirror(body_right))]
    sh.polygons += [body, sleeve, _mirror(sleeve)]
    for side in (1.0, -1.0):
        sh.seam([(side * shoulder[0], shoulder[1]), (side * armpit[0], armpit[1])])
    # cuff topstitch, parallel to the sleeve end
    back = 0.035
    d = (math.cos(angle), math.sin(angle))
    cuff = [(e1[0] - d[0] * back, e1[1] - d[1] * back), (e2[0] - d[0] * back, e2[1] - d[1] * back)]
    if kind == "sweater":
        rib_len = _u(rng, 0.05, 0.08)
        cuff = [
            (e1[0] - d[0] * rib_len, e1[1] - d[1] * rib_len),
            (e2[0] - d[0] * rib_len, e2[1] - d[1] * rib_len),
        ]
        rib_angle = math.atan2(math.cos(angle), -math.sin(angle))
        band = [cuff[0], e1, e2, cuff[1]]
        sh.ribs += [(band, rib_angle), (_mirror(band), math.pi - rib_angle)]
        sh.seam(cuff)
        sh.seam(_mirror(cuff))
        hem_h = _u(rng, 0.06, 0.09)
        y = 0.5 - hem_h
        xh = hw - (hw - armpit[0]) * hem_h / (0.5 - armpit[1])
        sh.ribs.append(([(-xh, y), (xh, y), (hw, 0.5), (-hw, 0.5)], 0.0))
        sh.seam([(-xh, y), (xh, y)])
    else:
        sh.seam(cuff, dashed=True)
        sh.seam(_mirror(cuff), dashed=True)
        y = 0.5 - _u(rng, 0.025, 0.04)
        sh.seam([(-hw + 0.02, y), (hw - 0.02, y)], dashed=True)
    if kind in ("jacket", "coat"):
        vd = _u(rng, 0.22, 0.36)
        sh.holes.append([(-nw / 2, top - 0.01), (nw / 2, top - 0.01), (0.0, top + vd)])
        sh.seam([(0.0, top + vd), (0.0, 0.5)])
        n = int(rng.integers(2, 5 if kind == "jacket" else 6))
        ys = np.linspace(top + vd + 0.06, 0.5 - 0.12, n).tolist()
        r = _u(rng, 0.014, 0.022)
        sh.buttons += [(0.035, y, r) for y in ys]
        py = _u(rng, 0.1, 0.22)
        for side in (1.0, -1.0):
            x0, x1 = side * 0.08, side * (hw - 0.07)
            sh.seam([(x0, py), (x1, py)])
            sh.seam([(x0, py), (x0, py + 0.12), (x1, py + 0.12), (x1, py)], dashed=True)
        # lapel edges
        for side in (1.0, -1.0):
            sh.seam([(side * nw / 2, top), (side * (nw / 2 + 0.05), top + vd * 0.6), (0.0, top + vd)])
    else:
        nd = _u(rng, 0.04, 0.1)
        sh.ellipse_holes.append((0.0, top, nw / 2, nd))
        sh.seam(_arc(0.0, top, nw / 2 + 0.025, nd + 0.025, 0.15, math.pi - 0.15, 13), dashed=kind == "tshirt")
    return sh


def _strap_top(bust: float, armhole: float, strap: float, neck: float) -> list[Point]:
    """Right half of a strapped bodice outline, from the neck to the armpit."""
    x_strap = neck / 2
    x_out = x_strap + strap
    arc = _arc(bust / 2, -0.5, bust / 2 - x_out, armhole, math.pi, math.pi / 2, 7)
    return [(x_strap, -0.5), *arc]


def _tank_top(rng: np.random.Generator) -> _Shape:
    sh = _Shape.empty()
    w, strap, nw = _u(rng, 0.5, 0.62), _u(rng, 0.06, 0.1), _u(rng, 0.22, 0.3)
    ad, nd, hem = _u(rng, 0.22, 0.32), _u(rng, 0.14, 0.26), _u(rng, 1.0, 1.12)
    right = [*_strap_top(w, ad, strap, nw), (w * hem / 2, 0.5)]
    sh.polygons.append([*right, *reversed(_mirror(right))])
    sh.ellipse_holes.append((0.0, -0.5, nw / 2, nd))
    sh.seam(_arc(0.0, -0.5, nw / 2 + 0.02, nd + 0.02, 0.1, math.pi - 0.1, 13), dashed=True)
    y = 0.5 - _u(rng, 0.025, 0.04)
    sh.seam([(-w * hem / 2 + 0.02, y), (w * hem / 2 - 0.02, y)], dashed=True)
    return sh


def _hem_curve(half_width: float, rise: float, n: int = 9) -> list[Point]:
    """Hem from right to left, the sides `rise` higher than the middle (an A-line laid flat)."""
    return [(x, 0.5 - rise * (x / half_width) ** 2) for x in np.linspace(half_width, -half_width, n).tolist()]


def _dress(rng: np.random.Generator) -> _Shape:
    sh = _Shape.empty()
    bust, strap, nw = _u(rng, 0.34, 0.44), _u(rng, 0.04, 0.07), _u(rng, 0.14, 0.2)
    ad, nd = _u(rng, 0.1, 0.16), _u(rng, 0.07, 0.15)
    yw = -0.5 + _u(rng, 0.28, 0.36)
    ww = bust * _u(rng, 0.8, 0.92)
    hw, rise = _u(rng, 0.62, 0.95) / 2, _u(rng, 0.02, 0.06)
    right = [*_strap_top(bust, ad, strap, nw), (ww / 2, yw)]
    sh.polygons.append([*right, *_hem_curve(hw, rise), (-ww / 2, yw), *reversed(_mirror(right))])
    sh.ellipse_holes.append((0.0, -0.5, nw / 2, nd))
    sh.seam([(-ww / 2, yw), (ww / 2, yw)])
    sh.seam([(x, y - 0.03) for x, y in _hem_curve(hw - 0.02, rise)], dashed=True)
    for side in (1.0, -1.0):  # bodice darts
        x = side * ww / 4
        sh.seam([(x, yw), (x * 1.05, yw - 0.1)])
    return sh


def _skirt(rng: np.random.Generator) -> _Shape:
    sh = _Shape.empty()
    ww, hw, wb, rise = _u(rng, 0.5, 0.64), _u(rng, 0.85, 1.25), _u(rng, 0.06, 0.1), _u(rng, 0.02, 0.07)
    sh.polygons.append([(-ww / 2, -0.5), (ww / 2, -0.5), (ww / 2, -0.5 + wb), *_hem_curve(hw / 2, rise),
                        (-ww / 2, -0.5 + wb)])  # fmt: skip
    sh.seam([(-ww / 2, -0.5 + wb), (ww / 2, -0.5 + wb)])
    sh.seam([(x, y - 0.03) for x, y in _hem_curve(hw / 2 - 0.02, rise)], dashed=True)
    pleats = int(rng.choice([0, 0, 4, 6, 8]))
    for k in range(1, pleats):
        f = k / pleats - 0.5
        x_bottom = f * hw * 0.96
        sh.seam([(f * ww, -0.5 + wb), (x_bottom, 0.5 - rise * (2 * x_bottom / hw) ** 2 - 0.01)])
    sh.buttons.append((ww / 2 - 0.05, -0.5 + wb / 2, wb * 0.3))
    return sh


def _legwear(rng: np.random.Generator, shorts: bool) -> _Shape:
    sh = _Shape.empty()
    if shorts:
        ww, crotch, lw, gap = (
            _u(rng, 0.68, 0.82),
            _u(rng, 0.5, 0.62),
            _u(rng, 0.34, 0.42),
            _u(rng, 0.05, 0.1),
        )
        hip_y, wb = -0.25, _u(rng, 0.08, 0.11)
    else:
        ww, crotch, lw, gap = (
            _u(rng, 0.36, 0.46),
            _u(rng, 0.28, 0.34),
            _u(rng, 0.14, 0.2),
            _u(rng, 0.04, 0.12),
        )
        hip_y, wb = -0.3, _u(rng, 0.04, 0.06)
    hip = ww * _u(rng, 1.04, 1.12)
    yc = -0.5 + crotch
    right = [(ww / 2, -0.5), (hip / 2, hip_y), (gap / 2 + lw, 0.5), (gap / 2, 0.5)]
    sh.polygons.append([*right, (0.0, yc), *reversed(_mirror(right))])
    sh.seam([(-ww / 2, -0.5 + wb), (ww / 2, -0.5 + wb)])
    fly = [(0.0, -0.5 + wb), (0.0, yc - 0.02)]
    sh.seam(fly)
    sh.seam([(0.045, -0.5 + wb), (0.045, yc - 0.06), (0.0, yc - 0.02)], dashed=True)
    for side in (1.0, -1.0):
        sh.seam([(side * (ww / 2 - 0.1), -0.5 + wb), (side * (hip / 2 - 0.012), hip_y + 0.03)])
        yh = 0.5 - 0.03
        sh.seam([(side * (gap / 2 + 0.015), yh), (side * (gap / 2 + lw - 0.015), yh)], dashed=True)
    sh.buttons.append((0.0, -0.5 + wb / 2, wb * 0.3))
    return sh


_BUILDERS: dict[str, Callable[[np.random.Generator], _Shape]] = {
    "tshirt": lambda rng: _top(rng, "tshirt"),
    "tank_top": _tank_top,
    "sweater": lambda rng: _top(rng, "sweater"),
    "jacket": lambda rng: _top(rng, "jacket"),
    "coat": lambda rng: _top(rng, "coat"),
    "dress": _dress,
    "skirt": _skirt,
    "trousers": lambda rng: _legwear(rng, shorts=False),
    "shorts": lambda rng: _legwear(rng, shorts=True),
}


def _place(kind: str, sh: _Shape, rng: np.random.Generator, seam_width: float) -> Garment:
    """Scale and centre a unit-frame shape: 30-70% coverage of the short-side square, 6% margins."""
    pts = np.array([p for poly in sh.polygons for p in poly], dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float((hi - lo).max())
    unit = Garment(kind, tuple(tuple(p) for p in sh.polygons), tuple(tuple(p) for p in sh.holes),
                   tuple(sh.ellipse_holes), (), (), (), (), (lo[0], lo[1], hi[0], hi[1]), 0.0)  # fmt: skip
    # area of the unit shape, measured on a coarse grid over its bounding box
    n = 64
    gx = lo[0] + (np.arange(n) + 0.5) / n * (hi[0] - lo[0])
    gy = lo[1] + (np.arange(n) + 0.5) / n * (hi[1] - lo[1])
    gu, gv = np.meshgrid(gx, gy)
    area = float(_garment_mask_at(gu, gv, unit).mean()) * float((hi - lo).prod())
    margin = 0.06
    fit = (1 - 2 * margin) / extent
    scale = min(fit, math.sqrt(_u(rng, 0.36, 0.6) / max(area, 1e-6)))
    center = (lo + hi) / 2
    room = np.maximum(0.0, (1 - 2 * margin) - (hi - lo) * scale) / 2
    offset = np.array([_u(rng, -1, 1), _u(rng, -1, 1)]) * room * 0.5

    def tf(p: Sequence[float]) -> Point:
        return (
            float((p[0] - center[0]) * scale + offset[0]),
            float((p[1] - center[1]) * scale + offset[1]),
        )

    def poly(ps: Sequence[Point]) -> Polygon:
        return tuple(tf(p) for p in ps)

    x0, y0 = tf(lo)
    x1, y1 = tf(hi)
    return Garment(
        kind=kind,
        polygons=tuple(poly(p) for p in sh.polygons),
        holes=tuple(poly(p) for p in sh.holes),
        ellipse_holes=tuple((*tf((cx, cy)), rx * scale, ry * scale) for cx, cy, rx, ry in sh.ellipse_holes),
        seams=tuple(poly(p) for p in sh.seams),
        dashed=tuple(sh.dashed),
        ribs=tuple((poly(p), a) for p, a in sh.ribs),
        buttons=tuple((*tf((cx, cy)), r * scale) for cx, cy, r in sh.buttons),
        bbox=(x0, y0, x1, y1),
        seam_width=seam_width,
    )


def _color_distance(a: str, b: str) -> float:
    ca, cb = np.array(COLORS[a], float), np.array(COLORS[b], float)
    luma = np.array([0.299, 0.587, 0.114])
    return float(np.linalg.norm(ca - cb) + 1.5 * abs((ca - cb) @ luma))


def _pick_colors(rng: np.random.Generator, n: int, light_second: bool = False) -> tuple[str, ...]:
    """A dominant colour that stands out from the white background, then clearly different accents."""
    names = list(COLORS)
    base_pool = [c for c in names if _color_distance(c, "white") > 110]
    chosen = [str(rng.choice(base_pool))]
    for _ in range(n - 1):
        if light_second and len(chosen) == 1:
            pool = [c for c in ("white", "cream") if _color_distance(c, chosen[0]) > 150]
        else:
            pool = [c for c in names if all(_color_distance(c, o) > 150 for o in chosen)]
        chosen.append(str(rng.choice(pool)))
    return tuple(chosen)


def _period(rng: np.random.Generator, kind: str, short_side: int) -> float:
    lo, hi, min_px = _PERIOD_PX[kind]
    px = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    return max(px / REFERENCE_SIDE, min_px / short_side)


def _sample_pattern(rng: np.random.Generator, short_side: int) -> Pattern:
    kind = str(rng.choice(PATTERNS, p=[0.1, 0.16, 0.08, 0.1, 0.1, 0.1, 0.12, 0.12, 0.12]))
    period = _period(rng, kind, short_side)
    phase = (_u(rng, 0, 1), _u(rng, 0, 1))
    angle, duty, bands, band_colors, motif, stagger = 0.0, 0.5, (), (), "", False
    if kind == "solid":
        colors = _pick_colors(rng, 1)
    elif kind in ("stripes", "zigzag"):
        colors = _pick_colors(rng, int(rng.choice([2, 2, 3])))
        if len(colors) == 2:
            duty = _u(rng, 0.3, 0.6)
            bands, band_colors = (1 - duty, duty), (0, 1)
        else:
            w = rng.dirichlet([4.0, 2.0, 3.0, 2.0])
            bands, band_colors = tuple(float(x) for x in w), (0, 1, 0, 2)
        choices = [0.0, math.pi / 2, math.pi / 4, -math.pi / 4, _u(rng, -math.pi, math.pi)]
        angle = float(rng.choice(choices)) if kind == "stripes" else float(rng.choice(choices[:2]))
        duty = _u(rng, 0.25, 0.6) if kind == "zigzag" else duty  # zigzag: amplitude / period
    elif kind in ("checked", "gingham"):
        colors = _pick_colors(rng, 2, light_second=kind == "gingham")
        angle = float(rng.choice([0.0, 0.0, 0.0, math.pi / 4]))
    elif kind == "plaid":
        colors = _pick_colors(rng, 3)
        k = int(rng.integers(4, 7))
        w = rng.dirichlet(np.full(k, 2.5))
        bands = tuple(float(x) for x in w)
        band_colors = (0, *(int(c) for c in rng.integers(0, 3, k - 1)))
        if 1 not in band_colors:
            band_colors = (*band_colors[:-1], 1)
        angle = float(rng.choice([0.0, 0.0, math.pi / 4]))
    elif kind == "dots":
        colors = _pick_colors(rng, 2)
        duty, stagger = _u(rng, 0.18, 0.32), bool(rng.random() < 0.6)
        angle = float(rng.choice([0.0, _u(rng, -0.5, 0.5)]))
    elif kind == "motif":
        colors = _pick_colors(rng, int(rng.choice([2, 3])))
        motif, duty, stagger = str(rng.choice(MOTIFS)), _u(rng, 0.3, 0.42), bool(rng.random() < 0.5)
    else:  # lettering
        colors = _pick_colors(rng, 2)
        angle = float(rng.choice([0.0, 0.0, _u(rng, -0.35, 0.35)]))
    return Pattern(kind, colors, motif, period, angle, phase, duty, bands, band_colors, stagger,
                   int(rng.integers(0, 2**31)))  # fmt: skip


def _sample_photo(rng: np.random.Generator, garment: Garment) -> Photo:
    px = 1.0 / REFERENCE_SIDE
    x0, y0, x1, y1 = garment.bbox
    folds = []
    for _ in range(int(rng.integers(2, 6))):
        hanging = rng.random() < 0.7  # vertical fold lines (variation along x) on hanging fabric
        folds.append(
            Fold(
                angle=float(rng.normal(0, 0.3)) if hanging else _u(rng, 0, math.pi),
                wavelength=_u(rng, 18, 56) * px,
                phase=_u(rng, 0, 2 * math.pi),
                center=(_u(rng, x0, x1), _u(rng, y0, y1)),
                radius=_u(rng, 0.12, 0.35),
                weight=_u(rng, 0.5, 1.0),
            )
        )
    gains = np.array([_u(rng, 0.97, 1.02), _u(rng, 0.98, 1.01), _u(rng, 0.97, 1.02)])  # a mild cast
    level = _u(rng, 0.92, 1.0)  # a white sweep, exposed for white (see the module docstring)
    return Photo(
        folds=tuple(folds),
        fold_displacement=_u(rng, 1.0, 2.5) * px,
        fold_shading=_u(rng, 0.25, 0.45),
        light_pos=(_u(rng, -0.6, 0.6), _u(rng, -0.8, -0.1)),
        light_falloff=_u(rng, 0.2, 0.45),
        edge_occlusion=_u(rng, 0.15, 0.35),
        shadow_offset=(_u(rng, -10, 10) * px, _u(rng, 3, 12) * px),
        shadow_sigma=_u(rng, 4, 10) * px,
        shadow_strength=_u(rng, 0.3, 0.6),
        background=tuple(level * _u(rng, 0.97, 1.0) for _ in range(3)),
        vignette=_u(rng, 0.0, 0.12),
        blur_sigma=_u(rng, 0.5, 1.0) * px,
        saturation=_u(rng, 0.75, 0.95),
        contrast=_u(rng, -0.2, 0.5),
        gains=tuple(float(g) for g in gains / gains.max() * _u(rng, 0.98, 1.04)),
        black_level=_u(rng, 0.0, 0.04),
        noise_sigma=_u(rng, 2.0, 6.0) / 255,
        chroma_noise=_u(rng, 0.2, 0.6),
        noise_seed=int(rng.integers(0, 2**63)),
    )


def sample_design(rng: np.random.Generator, size: tuple[int, int]) -> Design:
    """Draw one design. `size` = (W, H) only bounds the pattern repeat below (>= a few pixels)."""
    short_side = min(size)
    kind = str(rng.choice(list(GARMENTS)))
    shape = _BUILDERS[kind](rng)
    garment = _place(kind, shape, rng, seam_width=_u(rng, 0.9, 1.3) / REFERENCE_SIDE)
    pattern = _sample_pattern(rng, short_side)
    return Design(garment, pattern, _sample_photo(rng, garment))


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else " ".join(words[:-1]) + " and " + words[-1]


def caption_for(design: Design) -> str:
    """A short caption from the design, e.g. "a navy and white striped dress" (no domain words)."""
    p, kind = design.pattern, design.garment.kind
    noun = GARMENTS[kind]
    c = list(p.colors)
    if p.kind == "solid":
        body, tail = f"plain {c[0]} {noun}", ""
    elif p.kind in ("dots", "motif", "lettering"):
        accents = _and(c[1:])
        tail = {
            "dots": f" with {accents} polka dots",
            "motif": f" with a small {accents} {p.motif} print",
            "lettering": f" with {accents} lettering",
        }[p.kind]
        body = f"{c[0]} {noun}"
    else:
        adjective = {"stripes": "striped", "zigzag": "zigzag", "checked": "checked", "gingham": "gingham",
                     "plaid": "plaid"}[p.kind]  # fmt: skip
        body, tail = f"{_and(c)} {adjective} {noun}", ""
    if kind in PLURAL_GARMENTS:
        return f"a pair of {body}{tail}"
    article = "an" if body[0] in "aeiou" else "a"
    return f"{article} {body}{tail}"


# --------------------------------------------------------------------------------------------------
# Rasterization (all vectorized; coordinates are float arrays in frame units)
# --------------------------------------------------------------------------------------------------


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: Polygon) -> np.ndarray:
    """Even-odd point-in-polygon test over arrays of points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for k in range(n):
        xa, ya = poly[k]
        xb, yb = poly[(k + 1) % n]
        if ya == yb:
            continue
        crosses = (v < ya) != (v < yb)
        x_cross = xa + (v - ya) * ((xb - xa) / (yb - ya))
        inside ^= crosses & (u < x_cross)
    return inside


def _garment_mask_at(u: np.ndarray, v: np.ndarray, g: Garment) -> np.ndarray:
    mask = np.zeros(u.shape, dtype=bool)
    for poly in g.polygons:
        mask |= _in_polygon(u, v, poly)
    for poly in g.holes:
        mask &= ~_in_polygon(u, v, poly)
    for cx, cy, rx, ry in g.ellipse_holes:
        mask &= ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 > 1.0
    return mask


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


def _hash(*keys: np.ndarray | int) -> np.ndarray:
    """A vectorized 32-bit integer hash (xorshift-multiply) of integer arrays."""
    h = np.zeros((), dtype=np.uint64)
    mults = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)
    for k, key in enumerate(keys):
        h = h + np.asarray(key).astype(np.int64).astype(np.uint64) * np.uint64(mults[k % 4])
    h = h & np.uint64(0xFFFFFFFF)
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = ((h ^ (h >> np.uint64(shift))) * np.uint64(mult)) & np.uint64(0xFFFFFFFF)
    return h ^ (h >> np.uint64(16))


def _bands(t: np.ndarray, widths: Sequence[float], colors: Sequence[int]) -> np.ndarray:
    """Colour index of each position `t` (in periods) along a repeat made of bands."""
    edges = np.cumsum(widths)[:-1]
    band = np.searchsorted(edges, t - np.floor(t), side="right")
    return np.asarray(colors, dtype=np.int64)[band]


def _motif_inside(lx: np.ndarray, ly: np.ndarray, motif: str, r: float) -> np.ndarray:
    """Motif shape in cell-local coordinates (cell = 1, centred on 0); `r` is its radius."""
    ax, ay = np.abs(lx), np.abs(ly)
    if motif == "diamond":
        return ax + ay < r
    if motif == "cross":
        w = r * 0.36
        return ((ax < w) & (ay < r)) | ((ay < w) & (ax < r))
    if motif == "ring":
        d2 = lx * lx + ly * ly
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if motif == "triangle":
        return (ly < 0.5 * r) & (ax < 0.58 * (ly + r))
    if motif == "heart":
        x, y = lx / (0.85 * r), -(ly / (0.85 * r)) + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 < 0
    # floral: five petals
    theta = np.arctan2(ly, lx)
    rad = np.sqrt(lx * lx + ly * ly)
    return rad < r * (0.55 + 0.45 * np.abs(np.cos(2.5 * theta)))


def _palette(p: Pattern) -> np.ndarray:
    """(K, 3) float sRGB in [0, 1]; indices produced by `_pattern_index` point into it."""
    base = np.array([COLORS[c] for c in p.colors], dtype=np.float32) / 255
    if p.kind == "gingham":  # light, overlap (mid), dark
        return np.stack([base[1], (base[0] + base[1]) / 2, base[0]])
    if p.kind == "plaid":  # warp colour i crossing weft colour j -> the two threads mixed
        n = len(base)
        return np.stack([(base[i] + base[j]) / 2 for i in range(n) for j in range(n)])
    return base


def _pattern_index(u: np.ndarray, v: np.ndarray, p: Pattern) -> np.ndarray:
    ca, sa = math.cos(p.angle), math.sin(p.angle)
    x = (u * ca + v * sa) / p.period + p.phase[0]
    y = (-u * sa + v * ca) / p.period + p.phase[1]
    if p.kind == "solid":
        return np.zeros(u.shape, dtype=np.int64)
    if p.kind == "stripes":
        return _bands(x, p.bands, p.band_colors)
    if p.kind == "zigzag":
        tri = 2 * np.abs(y / 1.4 - np.floor(y / 1.4 + 0.5))  # triangle wave along the stripes
        return _bands(x + p.duty * 2 * tri, p.bands, p.band_colors)
    if p.kind == "checked":
        return ((np.floor(2 * x) + np.floor(2 * y)) % 2).astype(np.int64)
    if p.kind == "gingham":
        return ((x - np.floor(x) < 0.5).astype(np.int64)) + ((y - np.floor(y) < 0.5).astype(np.int64))
    if p.kind == "plaid":
        n = len(p.colors)
        return _bands(x, p.bands, p.band_colors) * n + _bands(y, p.bands, p.band_colors)
    if p.kind in ("dots", "motif"):
        row = np.floor(y)
        if p.stagger:
            x = x + 0.5 * (row % 2)
        col = np.floor(x)
        lx, ly = x - col - 0.5, y - row - 0.5
        if p.kind == "dots":
            return (lx * lx + ly * ly < p.duty * p.duty).astype(np.int64)
        ink = _motif_inside(lx, ly, p.motif, p.duty)
        accent = 1 + ((col + row) % (len(p.colors) - 1)).astype(np.int64)
        return np.where(ink, accent, 0)
    # lettering: rows of 3x5-cell glyphs; a line is 7 cells tall, a glyph 4 cells wide
    cx, cy = x * 7, y * 7
    iy = np.floor(cy).astype(np.int64)
    line = np.floor_divide(iy, 7)
    ry = iy - line * 7
    shift = (_hash(line, p.glyph_seed) % np.uint64(4)).astype(np.float32)
    ix = np.floor(cx + shift).astype(np.int64)
    col = np.floor_divide(ix, 4)
    rx = ix - col * 4
    g = (_hash(line, col, p.glyph_seed + 1) % np.uint64(len(_FONT) + 3)).astype(np.int64)
    glyph = np.minimum(g, len(_FONT) - 1)
    ink = (ry < 5) & (rx < 3) & (g < len(_FONT)) & _FONT[glyph, np.minimum(ry, 4), np.minimum(rx, 2)]
    return ink.astype(np.int64)


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


# --------------------------------------------------------------------------------------------------
# Photographic effects
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); each side in [32, 4096] and a multiple of 8 (the VAE downsamples by 8)."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {text!r} is not WxH; write it like 256x256 or 512x384")
    w, h = (int(p) for p in parts)
    for name, side in (("width", w), ("height", h)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise ValueError(
                f"size {text!r}: {name} {side} must be a multiple of {SIDE_MULTIPLE} between "
                f"{MIN_SIDE} and {MAX_SIDE}, e.g. 256x256"
            )
    return w, h


def split_counts(count: int, test_fraction: float) -> tuple[int, int]:
    """(train, test): the last round(count * test_fraction) designs are test, at least 1 (and at
    least 1 left for training) when count >= 2 and the fraction is positive."""
    n = round(count * test_fraction)
    if test_fraction > 0 and count >= 2:
        n = min(max(n, 1), count - 1)
    return count - n, n


def _make_item(args: tuple[int, int, tuple[int, int], str]) -> tuple[int, str]:
    """Worker: sample, draw and write one pair; depends only on (seed, index)."""
    index, seed, size, folder = args
    design = sample_design(np.random.default_rng([seed, index]), size)
    rendered, real = render_pair(design, size)
    name = f"{index:06d}.png"
    for domain, image in zip(DOMAINS, (rendered, real), strict=True):
        save_png(Path(folder) / domain / name, image)
    return index, caption_for(design)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it or choose another --out")
        if not (out / "dataset.json").is_file():
            # --overwrite deletes the folder; only ever do that to a dataset this command made.
            raise FileExistsError(
                f"{out} is not empty and has no dataset.json, so it is not a dataset made by "
                "`r2r-train data`; refusing to replace it even with --overwrite. Remove it yourself "
                "or choose another --out"
            )


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def generate_dataset(
    out: str | os.PathLike[str],
    count: int,
    size: tuple[int, int],
    seed: int,
    test_fraction: float = 0.1,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `count` render/real pairs to `out` (train/ and test/, each rendered/ and real/).

    Built in a sibling `out.partial-*` folder and renamed into place at the end, so an interrupted
    run never leaves a half dataset at `out`. Output is byte-identical for the same arguments,
    whatever `workers` is.
    """
    from tqdm import tqdm

    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count {count!r} must be a positive integer")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative integer")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction {test_fraction!r} must be in [0, 1), e.g. 0.1")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers {workers!r} must be a positive integer")
    size = parse_size(f"{size[0]}x{size[1]}")
    out = Path(out)
    _check_out_dir(out, overwrite)

    n_train, n_test = split_counts(count, test_fraction)
    with atomic_dir(out) as partial:
        for split in SPLITS:
            for domain in DOMAINS:
                (partial / split / domain).mkdir(parents=True)
        tasks = [(i, int(seed), size, str(partial / ("train" if i < n_train else "test"))) for i in range(count)]
        captions: list[str] = [""] * count
        with tqdm(total=count, desc="data", unit="pair", disable=not progress) as bar:
            if workers == 1:
                results: Iterator[tuple[int, str]] = map(_make_item, tasks)
                for i, caption in results:
                    captions[i] = caption
                    bar.update()
            else:
                # spawn: safe even when the parent has threads (torch, tokenizers) running
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    chunk = max(1, min(16, count // (workers * 8)))
                    for i, caption in pool.imap_unordered(_make_item, tasks, chunksize=chunk):
                        captions[i] = caption
                        bar.update()
        for split, indices in (("train", range(n_train)), ("test", range(n_train, count))):
            rows = [{"file_name": f"{i:06d}.png", "text": captions[i]} for i in indices]
            for domain in DOMAINS:
                _write_jsonl(partial / split / domain / "metadata.jsonl", rows)
        info = {
            "generator": "r2r.training.data",
            "generator_version": GENERATOR_VERSION,
            "count": count,
            "size": list(size),
            "seed": int(seed),
            "test_fraction": test_fraction,
            "splits": {"train": n_train, "test": n_test},
            "layout": "{split}/{rendered,real}/{index:06d}.png + metadata.jsonl (file_name, text)",
        }
        (partial / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _check_out_dir(out, overwrite)  # someone may have filled it meanwhile; the folder replaces `out` after this
    return out
