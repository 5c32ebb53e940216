"""The input policy: at what size each input runs, and how its output gets back to the input's own size
(docs/design.md, "Sizes").

An input runs at its own size when the bundle takes that size as it is (sides multiples of the bundle's pixel
multiple, inside its range) and it is within the pixel budget the user set, if any. Any other input is scaled down,
aspect kept, to fit the budget (the model's native area unless `--max-pixels`; never scaled up: that adds no detail
and costs time), padded to the next multiples by edge replication, translated, un-padded and resized back, so that
its output has exactly its width and height. `--fit crop` center-crops to multiples instead of padding; `--fit
stretch` resizes to the bundle's own size, aspect ignored (the public code's preprocessing) and keeps that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from PIL import Image

Fit = Literal["pad", "crop", "stretch"]
FITS: tuple[Fit, ...] = ("pad", "crop", "stretch")
PadMode = Literal["edge", "white"]
T = TypeVar("T")
MAX_SIDE = 4096  # the largest side the PyTorch reference is asked to run (it takes any multiple of the pixel multiple)


@dataclass(frozen=True)
class SizeRange:
    """The sizes a translator takes: sides multiples of `multiple` from `min` to `max` ((W, H) each), and the
    model's native size (the default pixel budget, and what --fit stretch runs at)."""

    multiple: int
    min: tuple[int, int]
    max: tuple[int, int]
    native: tuple[int, int]

    def takes(self, width: int, height: int) -> bool:
        return (not width % self.multiple and not height % self.multiple
                and self.min[0] <= width <= self.max[0] and self.min[1] <= height <= self.max[1])


@dataclass(frozen=True)
class Placement:
    """How one input of size `source` runs: resized to `scaled`, then padded (or center-cropped) to `run` with the
    scaled image at `offset` in the run (pad) or the run's window at `offset` in the scaled image (crop); the output
    is the run's window over the scaled image, resized to `output`."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    run: tuple[int, int]
    offset: tuple[int, int]
    fit: Fit
    output: tuple[int, int]

    @property
    def exact(self) -> bool:
        """The input runs as it is: no resampling, no padding."""
        return self.source == self.scaled == self.run == self.output


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def place(width: int, height: int, sizes: SizeRange, fit: Fit = "pad", max_pixels: int | None = None) -> Placement:
    """Where an input of width x height runs under `fit` (see the module docstring)."""
    src = (width, height)
    if fit == "stretch":
        return Placement(src, sizes.native, sizes.native, (0, 0), fit, sizes.native)
    if fit == "pad" and sizes.takes(width, height) and (max_pixels is None or width * height <= max_pixels):
        return Placement(src, src, src, (0, 0), fit, src)
    budget = max_pixels or sizes.native[0] * sizes.native[1]
    m = sizes.multiple
    scale = min(1.0, math.sqrt(budget / (width * height)), sizes.max[0] / width, sizes.max[1] / height)
    if fit == "crop":  # the window keeps whole multiples of the scaled image: its sides must reach the minimum
        scale = max(scale, sizes.min[0] / width, sizes.min[1] / height)
        sw, sh = round(width * scale), round(height * scale)
        run = (max(sizes.min[0], sw // m * m), max(sizes.min[1], sh // m * m))
        out = run if scale == 1.0 else (round(run[0] / scale), round(run[1] / scale))
        return Placement(src, (sw, sh), run, ((sw - run[0]) // 2, (sh - run[1]) // 2), fit, out)
    sw, sh = max(1, round(width * scale)), max(1, round(height * scale))
    run = (max(sizes.min[0], _up(sw, m)), max(sizes.min[1], _up(sh, m)))
    return Placement(src, (sw, sh), run, ((run[0] - sw) // 2, (run[1] - sh) // 2), fit, src)


def prepare(image: np.ndarray, p: Placement, pad: PadMode = "edge") -> np.ndarray:
    """uint8 [H, W, 3] at the input's size -> uint8 [h, w, 3] at the run size."""
    if image.shape[:2] != (p.source[1], p.source[0]):
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} for a placement of {p.source}")
    scaled = image if p.scaled == p.source else _resize(image, p.scaled)
    if p.scaled == p.run:
        return scaled
    (x, y), (rw, rh), (sw, sh) = p.offset, p.run, p.scaled
    if p.fit == "crop":
        return np.ascontiguousarray(scaled[y:y + rh, x:x + rw])
    widths = ((y, rh - sh - y), (x, rw - sw - x), (0, 0))
    if pad == "white":
        return np.pad(scaled, widths, mode="constant", constant_values=255)
    return np.pad(scaled, widths, mode="edge")


def restore(output: np.ndarray, p: Placement) -> np.ndarray:
    """uint8 [h, w, 3] at the run size -> the output at `p.output` (the input's own size unless crop or stretch)."""
    if p.fit == "pad" and p.scaled != p.run:
        (x, y), (sw, sh) = p.offset, p.scaled
        output = np.ascontiguousarray(output[y:y + sh, x:x + sw])
    current = (output.shape[1], output.shape[0])
    return output if current == p.output else _resize(output, p.output)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow BICUBIC, the preprocess's resampling (docs/design.md, "The method"); LANCZOS-free on purpose."""
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8).copy()


def group_by_size(items: Iterable[T], size_of: Callable[[T], tuple[int, int]], batch_size: int,
                  pending_max: int = 0) -> Iterator[list[T]]:
    """Batches of one run size, in a stream: a batch is yielded as soon as it is full, and when more than
    `pending_max` items wait (default 4 batches) the largest group goes, so a folder of mixed sizes streams in bounded
    memory; the rest at the end, in the order their sizes first came. One process and a Ray driver batch alike."""
    pending: dict[tuple[int, int], list[T]] = {}
    cap = pending_max or 4 * batch_size
    for item in items:
        size = size_of(item)
        group = pending.setdefault(size, [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(size)
        elif sum(len(g) for g in pending.values()) > cap:
            yield pending.pop(max(pending, key=lambda k: len(pending[k])))
    for size in list(pending):
        yield pending.pop(size)


__all__ = ["FITS", "MAX_SIDE", "Fit", "PadMode", "Placement", "SizeRange", "group_by_size", "place", "prepare",
           "restore"]
