"""One dataset item's parameters (`Design`: garment, pattern, photo) and `sample_design`, which draws
them from a seeded generator. The photo's backdrop is a white sweep exposed for white: generator version 1
tinted it grey, a flat level that no img2img method at strength 0.3 moves, so realism scores measured it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from r2r.training.data.garments import _BUILDERS, Garment, Point, _place, _u
from r2r.training.data.vocab import COLORS, GARMENTS, MOTIFS, PATTERNS

REFERENCE_SIDE = 256  # pattern periods, blur radii etc. are specified in pixels at this short side

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
