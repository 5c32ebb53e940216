"""Checking cuda-python calls: they return (cudaError_t, *outputs) instead of raising."""

from __future__ import annotations

from types import ModuleType
from typing import Any


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the function and the error."""


def cuda_check(cudart: ModuleType, fn: str, result: tuple) -> Any:
    """Raise CudaError naming `fn` on an error; else return the call's output (None, one value or a tuple)."""
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"{fn} failed: {getattr(err, 'name', err)}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


__all__ = ["CudaError", "cuda_check"]
