#!/usr/bin/env python3
"""Compare the method's outputs under several settings, from `r2r-train evaluate` reports of the same test split.

Usage::

    r2r-train evaluate --data D --out build/eval-pool1 --limit 24 --attention-pool 1 --cache-interval 1
    r2r-train evaluate --data D --out build/eval-pool2 --limit 24 --attention-pool 2 --cache-interval 1
    python tools/compare_settings.py build/eval-pool1 build/eval-pool2 --out docs/attention-pool-crops.png

The first report is the reference setting. Prints, per report, the PSNR of its `full` outputs against the first
report's (mean and minimum over the images), and writes a grid of the same crops (the centre of each of the first
`--images` test images): the input render, each setting's output, the real ground truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _load(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="r2r-train evaluate output folders; the first is the "
                        "reference setting")
    parser.add_argument("--out", type=Path, required=True, help="The crop grid (PNG).")
    parser.add_argument("--images", type=int, default=3, help="Test images in the grid.")
    parser.add_argument("--crop", type=int, default=96, help="Side of each crop (pixels).")
    parser.add_argument("--scale", type=int, default=2, help="Nearest-neighbour enlargement of each crop.")
    args = parser.parse_args()

    outputs = [_load(r / "images" / "full") for r in args.reports]
    names = sorted(outputs[0])
    for report, out in zip(args.reports, outputs, strict=True):
        if sorted(out) != names:
            raise SystemExit(f"{report}: its test images are not the first report's")
        values = [_psnr(out[n], outputs[0][n]) for n in names]
        print(f"{report.name}: PSNR of its outputs against {args.reports[0].name}'s: mean "
              f"{np.mean(values):.2f} dB, min {np.min(values):.2f} dB over {len(names)} images")

    columns = [("render", _load(args.reports[0] / "images" / "render_input"))]
    columns += [(r.name, out) for r, out in zip(args.reports, outputs, strict=True)]
    columns.append(("real", _load(args.reports[0] / "images" / "real_ground_truth")))
    side, label = args.crop * args.scale, 16
    grid = Image.new("RGB", (side * len(columns), label + side * args.images), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        draw.text((c * side + 4, 2), title, fill="black")
        for r, name in enumerate(names[: args.images]):
            img = images[name]
            y0, x0 = (img.shape[0] - args.crop) // 2, (img.shape[1] - args.crop) // 2
            crop = Image.fromarray(img[y0 : y0 + args.crop, x0 : x0 + args.crop])
            grid.paste(crop.resize((side, side), Image.NEAREST), (c * side, label + r * side))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
