"""The TensorRT and CUDA runtime Python APIs as shipped, kept as data (docs/design.md, "What is simulated").

`tensorrt_api.json` (TensorRT 10) and `tensorrt11_api.json` come from `tools/extract_trt_api.py`, which reads the
`tensorrt-cu12-bindings` wheels; `cudart_api.json` comes from `tools/extract_cudart_api.py`, which reads cuda-python's
`cuda.bindings.runtime`. `support.strict.make_module` turns a listing into a stand-in module that refuses any call
the real one would refuse by name or arguments: the fake builder of the tests and the CPU simulation of the GPU
path stand on it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

API_DIR = Path(__file__).resolve().parent
FILES = {"tensorrt": "tensorrt_api.json", "tensorrt10": "tensorrt_api.json", "tensorrt11": "tensorrt11_api.json",
         "cudart": "cudart_api.json"}


@cache
def _load(name: str) -> str:
    return (API_DIR / FILES[name]).read_text()


def load_api(name: str = "tensorrt") -> dict[str, Any]:
    """A fresh copy of one listing: "tensorrt" (= "tensorrt10"), "tensorrt11" or "cudart"."""
    if name not in FILES:
        raise KeyError(f"unknown API listing {name!r}; one of {sorted(FILES)}")
    return json.loads(_load(name))
