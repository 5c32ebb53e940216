"""Procedural paired garment dataset for FashionR2R: flat renders and their "photographed" twins, drawn
from seeded designs. Re-exports the names other code uses, each imported from its submodule on first use."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CAPTION_WORDS",
    "DOMAINS",
    "GARMENTS",
    "GENERATOR_VERSION",
    "SPLITS",
    "Design",
    "caption_for",
    "generate_dataset",
    "parse_size",
    "render_pair",
    "sample_design",
    "split_counts",
]

# Re-exported name -> its submodule. Lazy, so that importing one submodule (say, `render` for a few
# calibration renders) does not import the others, the dataset writer among them.
_SUBMODULE = {
    "CAPTION_WORDS": "vocab",
    "GARMENTS": "vocab",
    "Design": "designs",
    "sample_design": "designs",
    "caption_for": "captions",
    "render_pair": "render",
    "DOMAINS": "writer",
    "GENERATOR_VERSION": "writer",
    "SPLITS": "writer",
    "generate_dataset": "writer",
    "parse_size": "writer",
    "split_counts": "writer",
}


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
