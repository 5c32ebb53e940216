"""Garment silhouettes: per-kind shape builders (`_BUILDERS`) drawn in a unit frame, `_place`, which
scales one into the image frame as a `Garment`, and `_garment_mask_at`, the point-in-garment test."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Point = tuple[float, float]
Polygon = tuple[Point, ...]

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
