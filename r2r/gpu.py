"""The optional GPU stack, imported lazily: TensorRT, cuda-python's runtime, the CUDA device's identity.

Engines (build) and runtime (run) both need these; neither needs the other to get them. `tensorrt` and
`cuda.bindings` come with `pip install 'r2r[gpu]'` on an NVIDIA machine; without them every function here
fails with the install command, never with a bare ImportError.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from r2r.errors import R2RError

INSTALL_HINT = "TensorRT is not installed: pip install 'r2r[gpu]' on a machine with an NVIDIA GPU"
CUDA_INSTALL_HINT = "cuda-python is not installed: pip install 'r2r[gpu]' on a machine with an NVIDIA GPU"


class TensorRTNotInstalled(R2RError, ImportError):
    """The `gpu` extra is missing (or TensorRT's libraries cannot be loaded)."""


class GpuUnavailable(R2RError, RuntimeError):
    """No usable CUDA device; the message names the CUDA error."""


class CudaError(R2RError, RuntimeError):
    """A CUDA runtime call failed; the message names the function and the error."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except (ImportError, OSError):  # the package, or libnvinfer behind it
        raise TensorRTNotInstalled(INSTALL_HINT) from None
    return tensorrt


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except (ImportError, OSError):
        raise TensorRTNotInstalled(CUDA_INSTALL_HINT) from None
    return runtime


def cuda_check(cudart: ModuleType, fn: str, result: tuple) -> Any:
    """cuda-python returns (cudaError_t, *outputs) instead of raising: raise CudaError naming `fn` on an error,
    else return the call's output (None, one value or a tuple)."""
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"{fn} failed: {getattr(err, 'name', err)}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def gpu_info(device: int = 0, cudart: ModuleType | None = None) -> dict[str, Any]:
    """Name, compute capability and memory of a CUDA device, from `cudaGetDeviceProperties` (cuda-python)."""
    rt = cudart or import_cudart()
    err, prop = rt.cudaGetDeviceProperties(device)
    if err != rt.cudaError_t.cudaSuccess:
        raise GpuUnavailable(f"CUDA device {device} is not usable ({getattr(err, 'name', err)}): "
                             "TensorRT engines are built on the GPU they will run on")
    name = prop.name
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name), "compute_capability": f"{prop.major}.{prop.minor}",
            "total_memory_bytes": int(prop.totalGlobalMem), "device": device}


def tensorrt_usable() -> bool:
    """TensorRT and cuda-python import, and a CUDA device answers."""
    try:
        import_tensorrt()
        gpu_info()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


__all__ = ["CUDA_INSTALL_HINT", "INSTALL_HINT", "CudaError", "GpuUnavailable", "TensorRTNotInstalled", "cuda_check",
           "gpu_info", "import_cudart", "import_tensorrt", "tensorrt_usable"]
