"""Which file an ONNX Runtime session of a bundle graph opens, and the CUDA provider and run options of the device
path.

Both ORT backends (host memory: `backend_ort`, device memory: `backend_ort_device`) find their graphs here and open
them with `r2r.engines.onnxruntime.open_session`, so a graph runs with the same file and session options whichever
memory it is bound to, and with the options it was built with. The CUDA option builders are pure functions (names
from ONNX Runtime's `cuda_execution_provider_info.cc` and `onnxruntime_run_options_config_keys.h`), testable without
a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r2r.engines.onnxruntime import PROVIDERS, ROW, engine_key
from r2r.errors import R2RError
from r2r.log import log
from r2r.manifest import bundle_path
from r2r.runtime.bundle_reader import Bundle

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_INSTALL_HINT = ("ONNX Runtime's CUDAExecutionProvider is not available in this onnxruntime: "
                     "pip install 'r2r[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU")
# Run option keys (onnxruntime_run_options_config_keys.h).
GPU_GRAPH_ID = "gpu_graph_id"  # which CUDA graph a run captures / replays; -1: none; 0 is the default graph
NO_SYNC = "disable_synchronize_execution_providers"  # "1": no cudaStreamSynchronize at the end of a run
_ELEMENT_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.float16): np.float16, np.dtype(np.int64): np.int64}


def element_type(dtype: np.dtype) -> type:
    """The numpy type IOBinding.bind_input/bind_output take as `element_type` for a buffer's dtype."""
    if dtype not in _ELEMENT_TYPES:
        raise ValueError(f"ONNX Runtime buffers of {dtype} are not supported (float32, float16, int64)")
    return _ELEMENT_TYPES[dtype]


def cuda_available(ort: Any) -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


class ProviderUnavailable(R2RError, ImportError):
    """An execution provider was asked for that this onnxruntime install does not have."""


def require_cuda(ort: Any) -> None:
    """Fail early, naming the install, when the CUDA provider is asked for but this onnxruntime has none."""
    if not cuda_available(ort):
        raise ProviderUnavailable(CUDA_INSTALL_HINT)


def cuda_provider_options(device_id: int, stream: int, cuda_graph: bool = True) -> dict[str, str]:
    """CUDA EP options of every session of one backend: one device, one caller-owned stream for all sessions (so
    their runs are ordered without a host synchronization between them), CUDA graphs on. Values are strings, the
    form the provider parses (`user_compute_stream`: the cudaStream_t address in decimal)."""
    if not stream:
        raise ValueError("the CUDA sessions of a backend share one stream; got a null stream")
    return {"device_id": str(device_id), "has_user_compute_stream": "1", "user_compute_stream": str(int(stream)),
            "enable_cuda_graph": "1" if cuda_graph else "0"}


def cuda_run_config(graph_id: int | None) -> dict[str, str]:
    """Run config entries of one prepared call on CUDA: its own CUDA graph (captured on its first runs, replayed
    after), and no host synchronization at the end of the run. `graph_id` None: no graph (-1)."""
    if graph_id is not None and graph_id < 1:
        raise ValueError(f"gpu_graph_id {graph_id}: use ids >= 1 (0 is ONNX Runtime's default graph)")
    return {GPU_GRAPH_ID: str(-1 if graph_id is None else graph_id), NO_SYNC: "1"}


def run_options(ort: Any, entries: Mapping[str, str]) -> Any:
    ro = ort.RunOptions()
    for key, value in entries.items():
        ro.add_run_config_entry(key, value)
    return ro


def graph_source(bundle: Bundle, graph: str, device: str, precision: str, plain: bool = False) -> tuple[Path, bool]:
    """(file, pre-optimized): the bundle's ORT engine for this device and precision (optimized at build time) if it
    was built on this CPU, else (or with `plain`) the bundle's graph (optimized when the session opens)."""
    engine = None if plain else bundle.manifest.engines.get(ROW.slot(device, precision, graph))
    if engine is not None:
        if engine.key == engine_key(bundle.manifest.graphs[graph].key, precision, PROVIDERS[device]):
            return bundle_path(bundle.root, engine.files[0]), True
        log(f"r2r: the onnxruntime engine of {graph} was optimized on another CPU or onnxruntime; using the bundle's "
            f"graph (rebuild with `r2r-export build-engines --backend onnxruntime --out {bundle.root}`)")
    return bundle.graph_path(graph), False


def free_dims(inputs: Sequence[tuple[str, Sequence[int | str]]],
              shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The value of every named input dimension ("B", "2*B") at the bound shapes, for free dimension overrides."""
    dims: dict[str, int] = {}
    for name, spec in inputs:
        for i, d in enumerate(spec):
            if isinstance(d, str):
                value = int(shapes[name][i])
                if dims.setdefault(d, value) != value:
                    raise ValueError(f"dimension {d!r} is {dims[d]} and {value} in one call ({name})")
    return dims


def refuses_capture(exc: BaseException) -> bool:
    """ONNX Runtime's refusal, at session creation, to capture a graph some of whose nodes are not on the CUDA EP
    (typically a dynamic batch's shape arithmetic, placed on the CPU; or Memcpy nodes)."""
    return "graph capture" in str(exc)


__all__ = ["CPU_PROVIDER", "CUDA_INSTALL_HINT", "CUDA_PROVIDER", "GPU_GRAPH_ID", "NO_SYNC", "ProviderUnavailable",
           "cuda_available", "cuda_provider_options", "cuda_run_config", "element_type", "free_dims", "graph_source",
           "refuses_capture", "require_cuda", "run_options"]
