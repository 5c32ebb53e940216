"""ONNX Runtime "engines": graphs optimized offline per execution provider, saved in the bundle.

ORT's graph optimizations (constant folding, fusions, layout for the provider) are run once at build
time and the result saved, so a session opens without redoing them; the session options that go
with each saved graph are recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r2r.manifest import ENGINES_DIR, EngineEntry, bundle_path, read_manifest, record_file, verify_files, write_manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PRECISIONS = ("fp32",)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def session_options(threads: int = 0, optimized: bool = True) -> Any:
    """The options a saved graph runs with: its optimizations are already applied."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def engine_key(graph_key: str, precision: str, provider: str) -> str:
    """Fully optimized ORT graphs carry layout choices for this CPU, so its model and ISA are in the key."""
    import onnxruntime as ort

    from r2r.machine import describe_machine

    cpu = describe_machine()["cpu"]
    return hashlib.sha256(json.dumps([graph_key, precision, provider, ort.__version__, cpu]).encode()).hexdigest()


def build_ort_engines(bundle: Path, precision: str = "fp32", device: str = "cpu", graphs: list[str] | None = None,
                      progress: Callable[[str], None] = _log) -> list[EngineEntry]:
    """Optimize each bundle graph for one provider and save it under engines/onnxruntime/<device>-<precision>/."""
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise ValueError(f"onnxruntime precision {precision!r} is not built; available: {', '.join(PRECISIONS)}")
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"{provider} is not available in this onnxruntime; for cuda: pip install 'r2r[gpu]'")
    manifest = read_manifest(bundle)
    built: list[EngineEntry] = []
    for name in graphs or list(manifest.graphs):
        g = manifest.graphs[name]
        slot = f"onnxruntime/{device}-{precision}/{name}"
        rel = f"{ENGINES_DIR}/{slot}.onnx"
        key = engine_key(g.key, precision, provider)
        old = manifest.engines.get(slot)
        if old is not None and old.key == key and all(f in manifest.files for f in old.files):
            try:
                verify_files(bundle, manifest, only=old.files)
                progress(f"  {slot:<36} up to date")
                built.append(old)
                continue
            except ValueError:
                pass
        verify_files(bundle, manifest, only=[f for f in manifest.files if f.startswith(str(Path(g.file).parent))])
        t0 = time.perf_counter()
        out = bundle_path(bundle, rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        so = session_options(optimized=False)
        so.log_severity_level = 3  # the saved graph is hardware specific: the key records this CPU
        so.optimized_model_filepath = str(tmp)
        if g.external_data:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        f"{out.name}.data")
        ort.InferenceSession(str(bundle_path(bundle, g.file)), sess_options=so, providers=[provider])
        os.replace(tmp, out)
        files = [rel] + ([f"{rel}.data"] if g.external_data else [])
        for f in files:
            record_file(bundle, manifest, f)
        entry = EngineEntry("onnxruntime", precision, name, files, key, {
            "provider": provider, "onnxruntime": ort.__version__,
            "session_options": {"graph_optimization_level": "ORT_DISABLE_ALL (pre-optimized)",
                                "execution_mode": "ORT_SEQUENTIAL"},
            "build_seconds": round(time.perf_counter() - t0, 2)})
        manifest.engines[slot] = entry
        built.append(entry)
        progress(f"  {slot:<36} built in {entry.info['build_seconds']:.1f} s ({out.stat().st_size / 1e6:.1f} MB)")
    write_manifest(bundle, manifest)
    return built
