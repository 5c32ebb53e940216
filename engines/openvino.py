"""OpenVINO "engines": the bundle's graphs compiled for this CPU, kept in OpenVINO's model cache inside the bundle.

Each graph is compiled once, its batch dimension dynamic as exported, so one compiled model (one copy of the
weights) serves every batch the program binds: the routed UNet at B, 2B and 3B. Compiling is what costs (seconds per
graph for SD 1.5); OpenVINO's model cache turns a later compile of the same graph and configuration into a load that
does not read the ONNX weights at all. Building = compiling every graph the host program calls with the cache folder
in the bundle, then recording the cache files in the manifest; the runtime compiles through `compile_graph` here,
the one definition of the configuration, so its compiles are loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r2r import graph_io as io
from r2r.backends import BuildRequest, backend_row
from r2r.locks import writes_bundle
from r2r.log import log
from r2r.manifest import (
    ENGINES_DIR,
    BundleError,
    EngineEntry,
    Manifest,
    bundle_path,
    read_manifest,
    record_file,
    verify_files,
    write_manifest,
)

ROW = backend_row("openvino")
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
CACHE_DIR = f"{ENGINES_DIR}/openvino/cache"
INT8_UNET = ROW.slot("cpu", "int8", io.UNET)  # the manifest entry of the quantized UNet (engines/int8.py)


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"OpenVINO is not installed: {ROW.install}") from exc
    return openvino


def open_core(ov: Any, bundle: str | Path) -> Any:
    """An OpenVINO Core whose model cache is the bundle's."""
    core = ov.Core()
    cache = bundle_path(bundle, CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    core.set_property({"CACHE_DIR": str(cache)})
    return core


def default_threads() -> int:
    return os.cpu_count() or 1


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """int8: the quantized layers run INT8, the rest at the CPU's native float precision."""
    ROW.check_precision(precision)
    float_precision = ROW.native_precision() if precision == "int8" else precision
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[float_precision], "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"}


def graph_file(bundle: str | Path, manifest: Manifest, graph: str, precision: str) -> Path:
    """What to compile for `graph`: the INT8 UNet's IR at int8, else the bundle's ONNX graph."""
    if precision == "int8" and graph == io.UNET:
        entry = manifest.engines.get(INT8_UNET)
        if entry is None:
            raise BundleError(f"{bundle}: no INT8 UNet; build it (calibrated on the model) with `r2r-export "
                              f"build-engines --backend openvino --precision int8 --model MODEL --out {bundle}`")
        return bundle_path(bundle, entry.files[0])
    return bundle_path(bundle, manifest.graphs[graph].file)


def compile_graph(core: Any, path: Path, precision: str, threads: int) -> Any:
    """The graph at `path` compiled for the CPU at `precision`, its batch dynamic (a load from the model cache if
    it is there)."""
    return core.compile_model(str(path), "CPU", compile_config(precision, threads))


@writes_bundle
def build_ov_engines(bundle: str | Path, precision: str = "fp32", threads: int = 0,
                     progress: Callable[[str], None] = log) -> EngineEntry:
    """Compile every graph the host program calls into the bundle's model cache (int8: the INT8 UNet must have been
    built, `engines/int8.py`)."""
    ov = import_openvino()
    ROW.check_precision(precision)
    manifest = read_manifest(bundle)
    graphs = [g for g in manifest.graphs if g not in io.STEP_GRAPHS]  # host backends update latents in numpy
    verify_files(bundle, manifest, only=[f for f in manifest.files if not f.startswith(f"{ENGINES_DIR}/")])
    slot = ROW.slot("cpu", precision, "all")
    key = hashlib.sha256(json.dumps([sorted((g, e.key) for g, e in manifest.graphs.items()), precision,
                                     ov.__version__]).encode()).hexdigest()
    t0 = time.perf_counter()
    core = open_core(ov, bundle)
    for graph in graphs:
        compile_graph(core, graph_file(bundle, manifest, graph, precision), precision, threads or default_threads())
    cache = bundle_path(bundle, CACHE_DIR)
    files = sorted(str(p.relative_to(Path(bundle).resolve())) for p in cache.resolve().rglob("*") if p.is_file())
    for f in files:
        record_file(bundle, manifest, f)
    entry = EngineEntry("openvino", precision, "all", files, key,
                        {"openvino": ov.__version__, "batch": "dynamic",
                         "build_seconds": round(time.perf_counter() - t0, 1)})
    manifest.engines[slot] = entry
    write_manifest(bundle, manifest)
    size = sum(bundle_path(bundle, f).stat().st_size for f in files)
    progress(f"  {slot:<36} compiled in {entry.info['build_seconds']:.1f} s ({size / 1e6:.1f} MB cache)")
    return entry


def build(bundle: Path, request: BuildRequest, progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """The backend table's builder entry (`r2r-export build-engines --backend openvino`); int8 first calibrates and
    quantizes the UNet on the request's model."""
    built = []
    if request.precision == "int8":
        from r2r.engines.int8 import build_int8_unet

        if request.model is None:
            raise ValueError("--precision int8 calibrates on the bundle's model: pass --model")
        built.append(build_int8_unet(bundle, request.model, request.embedding, progress=progress))
    return [*built, build_ov_engines(bundle, request.precision, progress=progress)]


__all__ = ["CACHE_DIR", "INT8_UNET", "PRECISION_HINTS", "ROW", "build", "build_ov_engines", "compile_config",
           "compile_graph", "default_threads", "graph_file", "import_openvino", "open_core"]
