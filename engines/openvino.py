"""OpenVINO "engines": the bundle's graphs compiled for this CPU, kept in OpenVINO's model cache inside the bundle.

One compiled model per graph (batch dynamic: one copy of the weights for every batch); its blob in a folder of its
own per graph, precision, thread count, OpenVINO version and CPU, moved into place under the bundle lock; blobs are
a cache, not hashed in the manifest. The runtime compiles through `compile_graph`, so its compiles are loads.
Why: docs/design.md, "Verified engines".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r2r import graph_io
from r2r.atomic import temp_sibling
from r2r.backends import BuildRequest, backend_row
from r2r.locks import bundle_lock, writes_bundle
from r2r.log import log
from r2r.machine import cpu_identity
from r2r.manifest import (
    ENGINES_DIR,
    BundleError,
    EngineEntry,
    Manifest,
    bundle_path,
    read_manifest,
    verify_files,
    write_manifest,
)

ROW = backend_row("openvino")
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
CACHE_DIR = f"{ENGINES_DIR}/openvino/cache"
INT8_UNET = ROW.slot("cpu", "int8", graph_io.UNET)  # the manifest entry of the quantized UNet (engines/int8.py)


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"OpenVINO is not installed: {ROW.install}") from exc
    return openvino


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
    if precision == "int8" and graph == graph_io.UNET:
        entry = manifest.engines.get(INT8_UNET)
        if entry is None:
            raise BundleError(f"{bundle}: no INT8 UNet; build it (calibrated on the model) with `r2r-export "
                              f"build-engines --backend openvino --precision int8 --model MODEL --out {bundle}`")
        return bundle_path(bundle, entry.files[0])
    return bundle_path(bundle, manifest.graphs[graph].file)


def cache_folder(bundle: str | Path, manifest: Manifest, graph: str, precision: str, threads: int,
                 version: str) -> Path:
    """The folder of `graph`'s compiled blob for this configuration and CPU (docs/design.md, "Verified engines")."""
    if precision == "int8" and graph == graph_io.UNET:
        entry = manifest.engines.get(INT8_UNET)
        content = entry.key if entry is not None else ""
    else:
        content = manifest.graphs[graph].key
    key = hashlib.sha256(json.dumps([content, precision, threads, version, cpu_identity()],
                                    sort_keys=True).encode()).hexdigest()
    return bundle_path(bundle, f"{CACHE_DIR}/{graph}-{precision}-t{threads}-{key[:16]}")


def compile_graph(ov: Any, bundle: str | Path, manifest: Manifest, graph: str, precision: str, threads: int,
                  progress: Callable[[str], None] = log, cache: bool = True) -> Any:
    """`graph` compiled for the CPU at `precision`, its batch dynamic: a load from its cache folder if there is one;
    else a compile into a temporary folder, moved into place under the bundle lock (a folder another process moved
    there first is kept, ours dropped). `cache=False`: compiled in memory, no cache read or written."""
    path = graph_file(bundle, manifest, graph, precision)
    folder = cache_folder(bundle, manifest, graph, precision, threads, ov.__version__)
    config = compile_config(precision, threads)
    if not cache:
        return ov.Core().compile_model(str(path), "CPU", config)
    if folder.is_dir():
        return ov.Core().compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(folder)})
    tmp = temp_sibling(folder)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:  # a read-only bundle: compiled in memory, not kept
        progress(f"r2r: the compiled {graph} cannot be kept in {folder.parent} ({exc}); compiling it in memory")
        return compile_graph(ov, bundle, manifest, graph, precision, threads, progress, cache=False)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(tmp)})
        try:
            with bundle_lock(bundle, progress):
                if not folder.exists():
                    os.replace(tmp, folder)
        except OSError as exc:
            progress(f"r2r: the compiled {graph} could not be kept in {folder.parent} ({exc}); it will be compiled "
                     "again by the next process")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return compiled


def drop_cache(bundle: str | Path, manifest: Manifest, graph: str, precision: str, threads: int, version: str,
               progress: Callable[[str], None] = log) -> Path:
    """Remove `graph`'s compiled blob folder for this configuration (a blob whose output missed its canary)."""
    folder = cache_folder(bundle, manifest, graph, precision, threads, version)
    with bundle_lock(bundle, progress):
        shutil.rmtree(folder, ignore_errors=True)
    return folder


@writes_bundle
def build_ov_engines(bundle: str | Path, precision: str = "fp32", threads: int = 0,
                     progress: Callable[[str], None] = log) -> EngineEntry:
    """Compile every graph the host program calls into the bundle's model cache (int8: the INT8 UNet must have been
    built, `engines/int8.py`)."""
    ov = import_openvino()
    ROW.check_precision(precision)
    manifest = read_manifest(bundle)
    graphs = [g for g in manifest.graphs if g not in graph_io.STEP_GRAPHS]  # host backends update latents in numpy
    verify_files(bundle, manifest, only=[f for f in manifest.files if not f.startswith(f"{ENGINES_DIR}/")])
    slot = ROW.slot("cpu", precision, "all")
    threads = threads or default_threads()
    key = hashlib.sha256(json.dumps([sorted((g, e.key) for g, e in manifest.graphs.items()), precision,
                                     ov.__version__]).encode()).hexdigest()
    t0 = time.perf_counter()
    root = Path(bundle).resolve()
    folders = []
    for graph in graphs:
        compile_graph(ov, bundle, manifest, graph, precision, threads, progress)
        folders.append(cache_folder(bundle, manifest, graph, precision, threads, ov.__version__))
    # The blobs are a cache, checked by the canaries when loaded, not hashed (docs/design.md, "Verified engines").
    files = sorted(str(p.relative_to(root)) for f in folders if f.is_dir() for p in f.iterdir() if p.is_file())
    entry = EngineEntry("openvino", precision, "all", files, key,
                        {"openvino": ov.__version__, "batch": "dynamic", "threads": threads,
                         "cache": [f.name for f in folders], "build_seconds": round(time.perf_counter() - t0, 1)})
    manifest.engines[slot] = entry
    write_manifest(bundle, manifest)
    size = sum((root / f).stat().st_size for f in files)
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


__all__ = ["CACHE_DIR", "INT8_UNET", "PRECISION_HINTS", "ROW", "build", "build_ov_engines", "cache_folder",
           "compile_config", "compile_graph", "default_threads", "drop_cache", "graph_file", "import_openvino"]
