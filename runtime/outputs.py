"""An output of `r2r-run`: a PNG named after its input, with the parameters that made it inside, written atomically;
and when an existing one counts as done (`--resume`, and a Ray task retried after its actor died)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from r2r import __version__
from r2r.imageio import read_png_text, save_png

PARAMS_KEY = "r2r:parameters"


def params_hash(params: dict[str, Any]) -> str:
    """A short name for a run's parameters (results.jsonl records it per input)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(path: Path, params: dict[str, Any]) -> bool:
    """An output counts as done if it decodes whole and was made with the same parameters."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
        old = json.loads(read_png_text(path).get(PARAMS_KEY, "{}"))
    except (OSError, ValueError):
        return False
    return {k: v for k, v in old.items() if k != "source"} == params


def write_output(path: Path, image: np.ndarray, params: dict[str, Any], source: str) -> Path:
    """The translated image as a PNG (atomic), its parameters and its input's name inside."""
    text = {PARAMS_KEY: json.dumps({**params, "source": source}, sort_keys=True), "Software": f"r2r {__version__}"}
    return save_png(path, image, text)


__all__ = ["PARAMS_KEY", "is_complete", "params_hash", "write_output"]
