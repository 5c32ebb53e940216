"""Where r2r keeps what it makes once and reuses: bundles exported for a model, models converted from checkpoints
or with LoRAs fused."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from r2r.locks import bundle_lock


def cache_dir() -> Path:
    """R2R_CACHE, else $XDG_CACHE_HOME/r2r, else ~/.cache/r2r."""
    if os.environ.get("R2R_CACHE"):
        return Path(os.environ["R2R_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "r2r"


def made_once(out: Path, marker: str, make: Callable[[], object], what: str, progress: Callable[[str], None]) -> Path:
    """`out`, made by `make` (which writes it whole, `marker` included) unless it is there already; one process
    makes it, others started at once wait for it (a lock beside `out`: `out` itself is replaced whole)."""
    if (out / marker).is_file():
        return out
    with bundle_lock(out.with_name(out.name + ".lock"), progress):
        if not (out / marker).is_file():  # another process may have made it while this one waited
            progress(f"r2r: {what} -> {out}")
            make()
    return out


__all__ = ["cache_dir", "made_once"]
