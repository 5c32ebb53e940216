"""Where r2r keeps what it makes once and reuses: bundles exported for a model, models converted from checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """R2R_CACHE, else $XDG_CACHE_HOME/r2r, else ~/.cache/r2r."""
    if os.environ.get("R2R_CACHE"):
        return Path(os.environ["R2R_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "r2r"


__all__ = ["cache_dir"]
