"""OpenVINO "engines": the bundle's graphs compiled for this CPU at the shapes the coupled program binds, kept in
OpenVINO's model cache inside the bundle.

OpenVINO compiles a model for fixed shapes (seconds per graph for SD 1.5); its model cache turns a later compile of
the same graph, shapes and configuration into a load. Building = compiling every graph the host program calls at
every image batch times each multiple the program binds it at (`graph_io.CALL_MULTIPLES`), with the cache folder in
the bundle, then recording the cache files in the manifest. The runtime compiles through `compile_graph` here, the
one definition of the configuration, so its compiles of the same shapes are loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from r2r import graph_io as io
from r2r.backends import BuildRequest, backend_row
from r2r.log import log
from r2r.manifest import (
    ENGINES_DIR,
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


def compile_graph(ov: Any, core: Any, model: Any, shapes: Mapping[str, Sequence[int]], precision: str,
                  threads: int) -> Any:
    """`model` reshaped to `shapes` (input name -> shape) and compiled for the CPU at `precision`."""
    ROW.check_precision(precision)
    model = model.clone()
    model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(model, "CPU", config)


def program_shapes(manifest: Manifest, graph: str, batches: Sequence[int]) -> list[dict[str, tuple[int, ...]]]:
    """Every set of input shapes the coupled program binds `graph` at, for these image batches."""
    inputs = manifest.graphs[graph].inputs
    mults = io.CALL_MULTIPLES.get(graph, (1,))
    return [{t.name: io.concrete_shape(t.shape, b * m) for t in inputs} for b in sorted(set(batches)) for m in mults]


def build_ov_engines(bundle: str | Path, precision: str = "fp32", batches: Sequence[int] = (1,), threads: int = 0,
                     progress: Callable[[str], None] = log) -> EngineEntry:
    ov = import_openvino()
    ROW.check_precision(precision)
    manifest = read_manifest(bundle)
    graphs = [g for g in manifest.graphs if g not in io.STEP_GRAPHS]  # host backends update latents in numpy
    verify_files(bundle, manifest, only=[f for f in manifest.files if not f.startswith(f"{ENGINES_DIR}/")])
    slot = ROW.slot("cpu", precision, "all")
    key = hashlib.sha256(json.dumps([sorted((g, e.key) for g, e in manifest.graphs.items()), precision,
                                     sorted(batches), ov.__version__]).encode()).hexdigest()
    t0 = time.perf_counter()
    core = open_core(ov, bundle)
    for graph in graphs:
        model = core.read_model(str(bundle_path(bundle, manifest.graphs[graph].file)))
        for shapes in program_shapes(manifest, graph, batches):
            compile_graph(ov, core, model, shapes, precision, threads or default_threads())
    cache = bundle_path(bundle, CACHE_DIR)
    files = sorted(str(p.relative_to(Path(bundle).resolve())) for p in cache.resolve().rglob("*") if p.is_file())
    for f in files:
        record_file(bundle, manifest, f)
    entry = EngineEntry("openvino", precision, "all", files, key,
                        {"openvino": ov.__version__, "batches": sorted(batches),
                         "build_seconds": round(time.perf_counter() - t0, 1)})
    manifest.engines[slot] = entry
    write_manifest(bundle, manifest)
    size = sum(bundle_path(bundle, f).stat().st_size for f in files)
    progress(f"  {slot:<36} compiled in {entry.info['build_seconds']:.1f} s ({size / 1e6:.1f} MB cache)")
    return entry


def build(bundle: Path, request: BuildRequest, progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """The backend table's builder entry (`r2r-export build-engines --backend openvino`)."""
    return [build_ov_engines(bundle, request.precision, request.batches, progress=progress)]


__all__ = ["CACHE_DIR", "PRECISION_HINTS", "ROW", "build", "build_ov_engines", "compile_graph", "default_threads",
           "import_openvino", "open_core", "program_shapes"]
