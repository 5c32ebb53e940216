"""Recording each graph's canary (r2r/canary.py) in the bundle: the graph's outputs on fixed inputs, computed once on
ONNX Runtime fp32 (the engine the export checks every graph with), saved under canary/ and hashed in the manifest.

A bundle without graphs (the torch backend's) records its canaries from the PyTorch modules the graphs would be
exported from, at fp32: the same function, the reference the graphs are held to within 1e-4.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from r2r import graph_io
from r2r.atomic import atomic_path
from r2r.canary import (
    CanaryCase,
    GraphShape,
    canary_file,
    canary_key,
    canary_slot,
    make_inputs,
    multiples,
    save_cases,
)
from r2r.log import log
from r2r.manifest import Manifest, bundle_path, record_file, verify_files

# (graph, inputs) -> outputs by name, at fp32
Runner = Callable[[str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def graph_shape(bundle: Path, manifest: Manifest) -> GraphShape:
    """What the canary inputs are made from, read from the bundle (its conditioning file must be recorded)."""
    cond = load_file(str(bundle_path(bundle, manifest.cond["file"])))
    return GraphShape(int(manifest.latent["channels"]), cond[graph_io.COND_NULL].astype(np.float32),
                      cond[graph_io.COND_NEG].astype(np.float32),
                      [{"level": int(t["level"]), "channels": int(t["channels"])}
                       for t in manifest.tac_plan["layers"]], int(manifest.tac_plan.get("pool", 1)),
                      int(manifest.latent.get("deep_channels", 0)))


def onnxruntime_runner(bundle: Path, manifest: Manifest) -> Runner:
    """Each graph of the bundle on ONNX Runtime's CPU provider, fp32, all optimizations (one session per graph)."""
    import onnxruntime as ort

    sessions: dict[str, object] = {}

    def run(graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in sessions:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sessions.clear()  # one graph's weights in memory at a time (SD 1.5's UNet graphs are 3.4 GB each)
            sessions[graph] = ort.InferenceSession(str(bundle_path(bundle, manifest.graphs[graph].file)),
                                                   sess_options=so, providers=["CPUExecutionProvider"])
        sess = sessions[graph]
        names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
        return dict(zip(names, sess.run(None, dict(inputs)), strict=True))  # type: ignore[attr-defined]

    return run


def _recorded(bundle: Path, manifest: Manifest, slot: str, key: str) -> bool:
    entry = manifest.canaries.get(slot)
    if entry is None or entry.get("key") != key or entry.get("file") not in manifest.files:
        return False
    try:
        verify_files(bundle, manifest, only=[entry["file"]])
    except ValueError:
        return False
    return True


def record_canaries(bundle: Path, manifest: Manifest, graphs: Mapping[str, str], run: Runner, by: str,
                    size: tuple[int, int] | None = None, progress: Callable[[str], None] = log) -> list[str]:
    """Record the canary of every graph in `graphs` (graph -> its key) at `size` (default: the bundle's smallest)
    that is missing or out of date, in `manifest` (which the caller writes); drop those of graphs no longer there
    or changed. Returns the slots recorded."""
    size = size or (int(manifest.sizes["min"][0]), int(manifest.sizes["min"][1]))
    for slot, entry in list(manifest.canaries.items()):
        g = entry.get("graph")
        if g not in graphs or entry.get("key") != canary_key(graphs[g], tuple(entry.get("size", ()))):
            manifest.files.pop(entry.get("file", ""), None)
            bundle_path(bundle, entry.get("file", "")).unlink(missing_ok=True)
            del manifest.canaries[slot]
    shape: GraphShape | None = None
    made = []
    for graph, graph_key in graphs.items():
        slot, key = canary_slot(graph, size), canary_key(graph_key, size)
        if _recorded(bundle, manifest, slot, key):
            continue
        shape = shape or graph_shape(bundle, manifest)
        t0 = time.perf_counter()
        cases = []
        for k in multiples(graph):
            inputs = make_inputs(graph, k, size, shape)
            cases.append(CanaryCase(k, inputs, run(graph, inputs)))
        rel = canary_file(graph, size)
        with atomic_path(bundle_path(bundle, rel)) as tmp:
            save_cases(tmp, cases)
        record_file(bundle, manifest, rel)
        manifest.canaries[slot] = {"graph": graph, "size": list(size), "file": rel, "key": key, "by": by}
        made.append(slot)
        progress(f"  {'canary':<11} {graph} at {size[0]}x{size[1]} recorded in {time.perf_counter() - t0:.1f} s "
                 f"({by})")
    return made


def record_graph_canaries(bundle: Path, manifest: Manifest, size: tuple[int, int] | None = None,
                          progress: Callable[[str], None] = log) -> list[str]:
    """The canaries of every ONNX graph of the bundle, on ONNX Runtime fp32."""
    import onnxruntime as ort

    graphs = {g: e.key for g, e in manifest.graphs.items()}
    return record_canaries(bundle, manifest, graphs, onnxruntime_runner(bundle, manifest),
                           f"onnxruntime {ort.__version__} fp32", size, progress)


__all__ = ["Runner", "graph_shape", "onnxruntime_runner", "record_canaries", "record_graph_canaries"]
