"""`r2r-export refit`: a refittable bundle and its engines made those of another model of the same architecture.

Everything is checked before anything changes; the bundle is marked as being refitted (the runtime refuses it) until
the graphs, conditioning, TensorRT engines (refitted in place) and other backends' engines (rebuilt) are done and
the new source recorded. An interrupted refit is finished by running the command again.
Why: docs/design.md, "The bundle" (its Refit paragraph).
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from r2r.backends import BuildRequest, backend_row
from r2r.engines import tensorrt as trt_engines
from r2r.export import graph_refit as onnx_refit
from r2r.export.canary import record_graph_canaries
from r2r.gpu import gpu_info, import_tensorrt
from r2r.locks import bundle_lock
from r2r.log import log
from r2r.manifest import ENGINES_DIR, Manifest, bundle_path, read_manifest, verify_files, write_manifest


@dataclass
class RefitReport:
    graphs: dict[str, int] = field(default_factory=dict)  # graph -> initializers that changed
    tensorrt: list[str] = field(default_factory=list)  # engines refitted in place
    rebuilt: list[list[str]] = field(default_factory=list)  # [backend, precision, device] built again
    seconds: float = 0.0


def _builds_of(manifest: Manifest) -> list[list[str]]:
    """[backend, precision, device] of every engine build in the bundle other than TensorRT's."""
    builds: list[list[str]] = []
    for slot, entry in manifest.engines.items():
        if entry.backend == trt_engines.BACKEND:
            continue
        row = backend_row(entry.backend)
        device = next(d for d in row.devices if slot.startswith(row.slot(d, entry.precision, "")))
        if [row.name, entry.precision, device] not in builds:
            builds.append([row.name, entry.precision, device])
    return builds


def _check_tensorrt(bundle: Path, manifest: Manifest, trt: ModuleType | None, gpu: dict[str, Any] | None
                    ) -> tuple[ModuleType | None, dict[str, Any] | None]:
    engines = [e for e in manifest.engines.values() if e.backend == trt_engines.BACKEND]
    if not engines:
        return None, None
    fixed = [f"{e.graph} ({e.precision})" for e in engines if not e.info.get("refit") or "config" not in e.info]
    if fixed:
        raise trt_engines.TensorRTBuildError(
            f"{bundle}: TensorRT engines {', '.join(fixed)} were built without --refit and cannot take new weights; "
            "refit the bundle where it has none, then build them again with `r2r-export build-engines --backend "
            "tensorrt --refit`")
    try:
        t = trt or import_tensorrt()
    except ImportError as exc:
        raise ImportError(f"{bundle} has TensorRT engines, which only TensorRT can refit: run `r2r-export refit` "
                          f"where they were built ({exc})") from exc
    gpu = gpu if gpu is not None else gpu_info()
    trt_engines.check_engine_compat(manifest, t.__version__, gpu["name"], gpu["compute_capability"], bundle=bundle,
                                    current=False)
    return t, gpu


def drop_engines(bundle: Path, manifest: Manifest, backends: set[str]) -> None:
    """Remove every engine of `backends`: entries, files and each backend's engine folder (OpenVINO's model cache
    keeps blobs compiled from a graph path, whatever weights that path now holds)."""
    for slot, entry in list(manifest.engines.items()):
        if entry.backend in backends:
            del manifest.engines[slot]
    for backend in backends:
        folder = f"{ENGINES_DIR}/{backend}/"
        for f in [f for f in manifest.files if f.startswith(folder)]:
            del manifest.files[f]
        shutil.rmtree(bundle_path(bundle, folder), ignore_errors=True)
    write_manifest(bundle, manifest)


def refit_bundle(bundle: str | Path, model: Path, embedding: Path, trt: ModuleType | None = None,
                 gpu: dict[str, Any] | None = None, progress: Callable[[str], None] = log) -> RefitReport:
    """Make the refittable bundle at `bundle` that of `model` (a diffusers folder) and `embedding`; see the module
    docstring for the steps. `trt` / `gpu`: TensorRT's module and the GPU's facts (default: import and ask)."""
    root = Path(bundle)
    t0 = time.perf_counter()
    report = RefitReport()
    with bundle_lock(root, progress):
        # 1. checks
        manifest = read_manifest(root)
        onnx_refit.check_refittable(root, manifest)
        verify_files(root, manifest, only=[f for f in manifest.files if not f.startswith(f"{ENGINES_DIR}/")])
        target = onnx_refit.refit_target(root, manifest, model, embedding)
        t, gpu = _check_tensorrt(root, manifest, trt, gpu)
        # 2. the mark, with the builds this refit owes (none if no graph changes: a new text encoder or embedding
        # changes the conditioning only)
        graphs_change = any(e.key != target.keys[g] for g, e in manifest.graphs.items())
        owed = onnx_refit.begin(root, manifest, target, _builds_of(manifest) if graphs_change else [])
        # 3. graphs and conditioning
        onnx_refit.refit_graphs(root, manifest, target, progress)
        onnx_refit.refit_cond(root, manifest, target, progress)
        manifest = read_manifest(root)
        if record_graph_canaries(root, manifest, progress=progress):  # the refitted graphs' own outputs
            write_manifest(root, manifest)
        report.graphs = {g: len(names) for g, (_, names) in target.changed.items()}
        # 4. TensorRT, in place
        if t is not None:
            done = trt_engines.refit_bundle_engines(root, target.changed, trt=t, gpu=gpu, progress=progress)
            report.tensorrt = [f"{e.graph} ({e.precision})" for e in done]
        # 5. the other backends' engines, built again
        manifest = read_manifest(root)
        drop_engines(root, manifest, {b for b, _, _ in owed})
        for backend, precision, device in owed:
            row = backend_row(backend)
            request = BuildRequest(precision, device, model=target.comps.model_dir, embedding=embedding)
            progress(f"  building the {backend} {precision} engines again from the refitted graphs")
            importlib.import_module(row.builder or "").build(root, request, progress=progress)
        report.rebuilt = owed
        # 6. done
        onnx_refit.finish(root, read_manifest(root), target)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["RefitReport", "drop_engines", "refit_bundle"]
