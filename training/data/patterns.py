"""The repeating pattern as a pure function of position: `_pattern_index` maps frame coordinates to
indices into `_palette(pattern)` (stripes, checks, plaid, dots, motifs, bitmap lettering)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from r2r.training.data.designs import Pattern
from r2r.training.data.vocab import COLORS

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
