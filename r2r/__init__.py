"""r2r: FashionR2R from research script to production.

The public API: `r2r.Translator` (runtime/translator.py: open a model or a bundle once, translate images or files)
and `r2r.Method` (the method's parameters). `r2r/` imports no stage, so `Translator` is resolved from the runtime
stage when it is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from r2r.config import Method

__version__ = "0.1.0"
_LAZY = {"Translator": "r2r.runtime.translator"}  # public names that live in a later stage


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r2r' has no attribute {name!r}")


__all__ = ["Method", "Translator", "__version__"]
