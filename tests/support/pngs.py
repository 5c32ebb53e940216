"""Reading back what r2r writes into a PNG (its text chunks), for tests that check the recorded parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image


def png_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `r2r:parameters` record a written PNG carries."""
    with Image.open(Path(path)) as im:
        text = dict(getattr(im, "text", {}) or {})
    return json.loads(text["r2r:parameters"])
