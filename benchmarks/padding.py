"""`r2r-bench padding`: which padding an input that is not a multiple of the bundle's sides should get.

An input cut from a larger render is translated twice: padded to the bundle's multiple (edge-replicated, then
white) and un-padded, against the larger render translated at its own size and cut the same way, which is what
the padded run would give if the padding were the picture's true surroundings. The closer padding wins; the
border band (the pixels next to the padding) is where the two differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r2r.metrics import psnr

BAND = 16  # px next to the padded border


def _band(a: np.ndarray, width: int) -> np.ndarray:
    mask = np.zeros(a.shape[:2], bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return a[mask]


def padding_report(count: int = 6, size: tuple[int, int] = (256, 192), cut: tuple[int, int] = (194, 130),
                   backend: str = "auto", threads: int = 0) -> dict[str, Any]:
    """Edge vs white padding on `count` procedural renders of `size`, each cut to `cut` at a seeded offset."""
    from r2r.runtime.translator import Translator
    from r2r.sizing import prepare, restore
    from r2r.training.data import render_pair, sample_design

    runtime = Translator(backend=backend, threads=threads).runtime
    place = runtime.place(*cut)
    if place.scaled != place.source or place.run == place.source:
        raise ValueError(f"{cut}: not a padded size for this bundle ({place})")
    rows: dict[str, list[tuple[float, float]]] = {"edge": [], "white": []}
    try:
        for i in range(count):
            rng = np.random.default_rng([21, i])
            render = render_pair(sample_design(rng, size), size)[0]
            whole = runtime([render])[0]
            x, y = int(rng.integers(0, size[0] - cut[0] + 1)), int(rng.integers(0, size[1] - cut[1] + 1))
            part = np.ascontiguousarray(render[y:y + cut[1], x:x + cut[0]])
            truth = whole[y:y + cut[1], x:x + cut[0]]
            for mode in rows:
                out = restore(runtime([prepare(part, place, pad=mode)])[0], place)  # type: ignore[arg-type]
                rows[mode].append((psnr(out, truth), psnr(_band(out, BAND), _band(truth, BAND))))
    finally:
        runtime.close()
    summary = {mode: {"psnr_db_mean": float(np.mean([a for a, _ in r])),
                      "border_band_psnr_db_mean": float(np.mean([b for _, b in r])),
                      "psnr_db": [a for a, _ in r], "border_band_psnr_db": [b for _, b in r]}
               for mode, r in rows.items()}
    return {"size": list(size), "cut": list(cut), "run": list(place.run), "band_px": BAND, "images": count,
            "runtime": runtime.describe(), "padding": summary,
            "better": max(summary, key=lambda m: summary[m]["border_band_psnr_db_mean"])}


__all__ = ["padding_report"]
