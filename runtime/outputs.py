"""An output of `r2r-run`: a PNG named after its input, with the parameters that made it inside, written atomically;
and when an existing one counts as done (`--resume`, and a Ray task retried after its actor died)."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

from r2r import __version__, storage
from r2r.imageio import save_png
from r2r.storage import Location

PARAMS_KEY = "r2r:parameters"


def params_hash(params: dict[str, Any]) -> str:
    """A short name for a run's parameters (results.jsonl records it per input)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(path: Location, params: dict[str, Any]) -> bool:
    """An output (a path or a URL) counts as done if it decodes whole and was made with the same parameters."""
    from PIL import Image

    if not storage.is_file(path):
        return False
    try:
        source = io.BytesIO(storage.read_bytes(path)) if isinstance(path, str) else path
        with Image.open(source) as im:
            im.load()
            old = json.loads(getattr(im, "text", {}).get(PARAMS_KEY, "{}"))
    except (OSError, ValueError):
        return False
    return {k: v for k, v in old.items() if k != "source"} == params


def output_text(params: dict[str, Any], source: str) -> dict[str, str]:
    """The text an output PNG carries: the parameters that made it and its input's name."""
    return {PARAMS_KEY: json.dumps({**params, "source": source}, sort_keys=True), "Software": f"r2r {__version__}"}


def write_output(path: Location, image: np.ndarray, params: dict[str, Any], source: str) -> Location:
    """The translated image as a PNG (atomic), its parameters and its input's name inside."""
    return save_png(path, image, output_text(params, source))


__all__ = ["PARAMS_KEY", "is_complete", "output_text", "params_hash", "write_output"]
