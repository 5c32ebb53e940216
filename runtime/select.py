"""Choosing and constructing a backend for a bundle, and the embedded default's cached bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, default_resolution, sha256_tree
from r2r.runtime.bundle import Bundle
from r2r.runtime.device import Backend

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")
DEVICES = {"onnxruntime": ("cpu", "cuda"), "openvino": ("cpu",), "tensorrt": ("cuda",)}  # bundle backends


def cache_dir() -> Path:
    """R2R_CACHE, else $XDG_CACHE_HOME/r2r, else ~/.cache/r2r."""
    if os.environ.get("R2R_CACHE"):
        return Path(os.environ["R2R_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "r2r"


def default_bundle(batch_max: int = 4) -> Path:
    """The embedded default's bundle, exported once into the cache (a re-run checks hashes only)."""
    from r2r.export.bundle import ExportConfig, export_bundle

    w, h = default_resolution(EMBEDDED_DEFAULT)
    digest = sha256_tree(EMBEDDED_DEFAULT)[:12]
    out = cache_dir() / "bundles" / f"embedded-{digest}-{w}x{h}-b{batch_max}"
    print(f"r2r-run: using the embedded default's bundle {out}", file=sys.stderr)
    export_bundle(ExportConfig(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT / EMBEDDING_FILE, out, w, h, batch_max))
    return out


def _tensorrt_usable(bundle: Bundle) -> bool:
    """Engines in the bundle, TensorRT and cuda-python importable, and a GPU visible."""
    if not any(e.backend == "tensorrt" for e in bundle.manifest.engines.values()):
        return False
    from r2r.engines.tensorrt import gpu_info, import_cudart, import_tensorrt

    try:
        import_tensorrt()
        import_cudart()
        gpu_info()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def default_precision(name: str, bundle: Bundle) -> str:
    """TensorRT: the precision the bundle's engines were built with (fp16 first); CPU backends: fp32."""
    if name == "tensorrt":
        built = {e.precision for e in bundle.manifest.engines.values() if e.backend == "tensorrt"}
        for p in ("fp16", "bf16", "fp8", "int8", "fp32"):
            if p in built:
                return p
    return "fp32"


def resolve_backend(name: str, bundle: Bundle, device: str = "auto") -> str:
    """auto: tensorrt when usable (and the device is not cpu), else onnxruntime."""
    if name != "auto":
        return name
    return "tensorrt" if device != "cpu" and _tensorrt_usable(bundle) else "onnxruntime"


def resolve_device(name: str, device: str = "auto") -> str:
    """The device a bundle backend runs on. onnxruntime: cuda (device-resident buffers, CUDA graphs) when this
    onnxruntime has the CUDA provider, else cpu (host buffers); asking for cuda without it names the install."""
    allowed = DEVICES.get(name)
    if allowed is None:
        raise ValueError(f"backend {name!r} does not run bundles; choose one of {', '.join(BACKENDS)}")
    if device not in ("auto", *allowed):
        raise ValueError(f"--device {device}: the {name} backend runs on {' or '.join(allowed)}")
    if name != "onnxruntime":
        return allowed[0]
    import onnxruntime as ort

    from r2r.runtime.ort_session import cuda_available, require_cuda

    if device == "cuda":
        require_cuda(ort)
        return "cuda"
    return "cuda" if device == "auto" and cuda_available(ort) else "cpu"


def make_backend(name: str, bundle: Bundle, precision: str = "fp32", device: str = "auto") -> Backend:
    device = resolve_device(name, device)
    if name == "onnxruntime" and device == "cuda":
        from r2r.runtime.backend_ort_device import OrtDeviceBackend

        return OrtDeviceBackend(bundle, "cuda", precision=precision)
    if name == "onnxruntime":
        from r2r.runtime.backend_ort import OrtBackend

        return OrtBackend(bundle, precision=precision)
    if name == "openvino":
        from r2r.runtime.backend_ov import OpenVinoBackend

        return OpenVinoBackend(bundle, precision=precision)
    from r2r.runtime.backend_trt import TrtBackend

    return TrtBackend(bundle, precision=precision)
