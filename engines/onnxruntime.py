"""ONNX Runtime "engines": graphs optimized offline per execution provider, saved in the bundle.

Two passes, once, at build time: every attention is fused into `com.microsoft.MultiHeadAttention` with separate
Q, K, V, no mask and no bias (`fuse_attention`: the exported scaled-dot-product pattern, matched by onnxscript's
SDPA and MHA rules alone; its other ORT fusions emit CUDA-only operators such as GroupNorm), which is ONNX Runtime's
flash-attention kernel on CPU: memory linear in the tokens instead of the full score matrix. Then ORT's own graph
optimizations (constant folding, fusions, layout for the provider), the result saved so that a session opens
without redoing them. The session options that go with each saved graph are recorded in the manifest; the runtime
opens every session through `open_session` here, so a graph is built and run with one definition of its options.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from r2r.atomic import atomic_path
from r2r.backends import BuildRequest, backend_row
from r2r.locks import writes_bundle
from r2r.log import log
from r2r.manifest import ENGINES_DIR, EngineEntry, bundle_path, read_manifest, record_file, verify_files, write_manifest

ROW = backend_row("onnxruntime")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(ort: Any, threads: int = 0, preoptimized: bool = False,
                    free_dims: Mapping[str, int] | None = None) -> Any:
    """Options of every session, at build and at run time. A pre-optimized graph (an engine of this module) opens
    with optimizations off; `free_dims` fixes named input dimensions ("B", "2*B"), so that the optimizer folds the
    shape arithmetic of a dynamic-batch graph (then a pre-optimized graph is optimized again)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spin-waiting between runs: a program alternates sessions (step caching's two UNet graphs, emit and inject,
    # the VAE's), and one session's idle threads spinning took the cores from the next (step caching at K = 2 ran
    # at 1.6 s per image instead of 1.0 on 2 cores; K = 1 is unchanged).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if preoptimized and not free_dims
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for name, value in (free_dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    return so


def open_session(ort: Any, model: Path | bytes, threads: int, providers: Sequence[Any],
                 preoptimized: bool = False, free_dims: Mapping[str, int] | None = None) -> Any:
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(ort, threads, preoptimized, free_dims),
                                providers=list(providers))


def engine_key(graph_key: str, precision: str, provider: str) -> str:
    """Fully optimized ORT graphs carry layout choices for this CPU, so its model and ISA are in the key."""
    import onnxruntime as ort
    import onnxscript

    from r2r.machine import describe_machine

    cpu = describe_machine()["cpu"]
    parts = [graph_key, precision, provider, ort.__version__, cpu, "mha", onnxscript.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def fuse_attention(src: Path, dst: Path, external_data: bool) -> int:
    """Write `src` with every scaled-dot-product attention as one com.microsoft.MultiHeadAttention to `dst`;
    returns how many were fused."""
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    model = ir.load(str(src))
    ShapeInferencePass()(model)
    optimizer.optimize(model)
    if fuse_sdpa(model, apply_shape_inference=True) == 0:
        return 0
    fused = fuse_mha1(model) + fuse_mha2(model)
    ir.save(model, str(dst), external_data=f"{dst.name}.data" if external_data else None)
    return fused


@writes_bundle
def build_ort_engines(bundle: Path, precision: str = "fp32", device: str = "cpu", graphs: list[str] | None = None,
                      progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """Optimize each bundle graph for one provider and save it under engines/onnxruntime/<device>-<precision>/."""
    import onnxruntime as ort

    ROW.check_precision(precision)
    ROW.check_device(device)
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"{provider} is not available in this onnxruntime; for cuda: pip install 'r2r[gpu]'")
    manifest = read_manifest(bundle)
    built: list[EngineEntry] = []
    for name in graphs or list(manifest.graphs):
        g = manifest.graphs[name]
        slot = ROW.slot(device, precision, name)
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
        source = bundle_path(bundle, g.file)
        with atomic_path(out) as tmp:
            fused_path = tmp.with_name(f"{tmp.name}.mha.onnx")
            try:
                fused = fuse_attention(source, fused_path, g.external_data)
                so = session_options(ort)
                so.log_severity_level = 3  # the saved graph is hardware specific: the key records this CPU
                so.optimized_model_filepath = str(tmp)
                if g.external_data:
                    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                f"{out.name}.data")
                ort.InferenceSession(str(fused_path if fused else source), sess_options=so, providers=[provider])
            finally:
                fused_path.unlink(missing_ok=True)
                fused_path.with_name(f"{fused_path.name}.data").unlink(missing_ok=True)
        files = [rel] + ([f"{rel}.data"] if g.external_data else [])
        for f in files:
            record_file(bundle, manifest, f)
        entry = EngineEntry("onnxruntime", precision, name, files, key, {
            "provider": provider, "onnxruntime": ort.__version__, "multi_head_attention": fused,
            "session_options": {"graph_optimization_level": "ORT_DISABLE_ALL (pre-optimized)",
                                "execution_mode": "ORT_SEQUENTIAL"},
            "build_seconds": round(time.perf_counter() - t0, 2)})
        manifest.engines[slot] = entry
        built.append(entry)
        progress(f"  {slot:<36} built in {entry.info['build_seconds']:.1f} s ({out.stat().st_size / 1e6:.1f} MB, "
                 f"{fused} attention layers as MultiHeadAttention)")
    write_manifest(bundle, manifest)
    return built


def build(bundle: Path, request: BuildRequest, progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """The backend table's builder entry (`r2r-export build-engines --backend onnxruntime`)."""
    return build_ort_engines(bundle, precision=request.precision, device=request.device, progress=progress)


__all__ = ["PROVIDERS", "ROW", "build", "build_ort_engines", "engine_key", "fuse_attention", "open_session",
           "session_options"]
