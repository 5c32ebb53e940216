"""`r2r-bench gpu-check --out DIR`: the GPU path's figures in one prepared command (report.json, report.md).

On CUDA: the torch backend's parity against the CPU reference, and its time per image (eager, one CUDA graph) beside
the public code's way on the SD 1.5 architecture at 768x1024; TensorRT and onnxruntime-gpu are not run. Without a
GPU: the same on the CPU with the embedded default, a rehearsal, plus the capture audit. `quick` reduces the steps.
Why: docs/design.md, "The GPU path"; the steps: benchmarks/gpu-check.md.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r2r.config import Method, Variant
from r2r.log import log
from r2r.metrics import psnr


@dataclass(frozen=True)
class Setup:
    device: str  # "cuda" or "cpu" (the rehearsal)
    width: int
    height: int
    method: Method
    precisions: tuple[str, ...]


def _renders(count: int, width: int, height: int) -> list[np.ndarray]:
    from r2r.training.data import render_pair, sample_design

    return [render_pair(sample_design(np.random.default_rng([2026, i]), (width, height)), (width, height))[0]
            for i in range(count)]


def _bundle(model: Path, out: Path, width: int, height: int) -> Any:
    """The conditioning-only bundle of `model` (the torch backend runs the model's modules, not ONNX graphs)."""
    from r2r.export.bundle_writer import ExportConfig, export_bundle
    from r2r.models import EMBEDDING_FILE
    from r2r.runtime.bundle_reader import open_bundle

    export_bundle(ExportConfig(model, model / EMBEDDING_FILE, out, width, height, batch_max=1, graphs=()),
                  progress=lambda _: None)
    return open_bundle(out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_gpu_mb(device: str, reset: bool = False) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def parity(setup: Setup, work: Path) -> list[dict[str, Any]]:
    """The torch backend on the device against the CPU reference (fp32) on the embedded default, one image."""
    from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, default_resolution, load_components
    from r2r.reference import ReferencePipeline
    from r2r.runtime.backend_torch import TorchBackend
    from r2r.runtime.scheduler import CoupledScheduler, program_graphs
    from r2r.runtime.verify import verify_graphs

    w, h = default_resolution(EMBEDDED_DEFAULT)
    bundle = _bundle(EMBEDDED_DEFAULT, work / "bundles" / "embedded", w, h)
    image = _renders(1, w, h)[0]
    ref = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, w, h)
    expected = ref([image], setup.method)[0]
    rows = []
    for precision in setup.precisions:
        try:
            backend = TorchBackend(bundle, EMBEDDED_DEFAULT, setup.device, precision)
            verified = verify_graphs(backend, bundle, program_graphs(Variant(fused=True)))  # the canaries first
            sched = CoupledScheduler(bundle, backend, 1, setup.method, Variant(fused=True))
            first = sched([image])[0]  # eager first run (and the capture, on CUDA)
            got = sched([image])[0]  # on CUDA: the replay
            rows.append({"precision": precision, "device": setup.device, "psnr_db": psnr(got, expected),
                         "max_abs_error": int(np.abs(got.astype(int) - expected.astype(int)).max()),
                         "replay_equals_first_run": bool(np.array_equal(first, got)),
                         "canaries": verified.describe()})
            log(f"  parity {setup.device} {precision}: {rows[-1]['psnr_db']:.1f} dB, max abs error "
                f"{rows[-1]['max_abs_error']}")
            backend.close()
            del sched, backend
        except Exception as exc:
            rows.append({"precision": precision, "device": setup.device, "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"  parity {setup.device} {precision}: FAILED {rows[-1]['error']}")
        gc.collect()
    return rows


def _time(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, float | None]:
    """(min seconds over `repeats` timed runs after one untimed run, peak GPU MB over them all)."""
    _peak_gpu_mb(device, reset=True)
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), _peak_gpu_mb(device)


def timings(setup: Setup, model: Path, work: Path, repeats: int) -> list[dict[str, Any]]:
    """Seconds per image of the public code's way and the torch backend (eager, CUDA graphs), one image."""
    import torch

    from r2r.benchmarks.public_code import PublicCodePipeline
    from r2r.models import EMBEDDING_FILE, load_components
    from r2r.runtime.backend_torch import TorchBackend
    from r2r.runtime.scheduler import CoupledScheduler

    precision = setup.precisions[-1] if setup.device == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    image = _renders(1, setup.width, setup.height)[0]
    bundle = _bundle(model, work / "bundles" / model.name, setup.width, setup.height)
    rows: list[dict[str, Any]] = []
    comps = load_components(model, device=setup.device, dtype=dtype)
    public = PublicCodePipeline(comps, model / EMBEDDING_FILE, setup.width, setup.height, setup.method.divisor)
    seconds, peak = _time(lambda p=public: p([image], setup.method), setup.device, repeats)
    rows.append({"name": f"public-code {precision}", "evaluations": public.evaluations / max(public.images, 1),
                 "s_per_image": seconds, "peak_gpu_mb": peak, "steps": 2 * len(public._schedule(setup.method)[0])})
    log(f"  {rows[-1]['name']}: {seconds:.3f} s/image")
    del public, comps
    gc.collect()
    graphs = setup.device == "cuda"
    for inversion, fused in (("exact", True), ("single-pass", False)):
        for cuda_graph in ((False, True) if graphs else (False,)):
            name = f"torch {precision} {inversion}{' + CUDA graph' if cuda_graph else ' eager'}"
            try:
                backend = TorchBackend(bundle, model, setup.device, precision, cuda_graph=cuda_graph)
                sched = CoupledScheduler(bundle, backend, 1, setup.method, Variant(inversion, fused))
                seconds, peak = _time(lambda s=sched: s([image]), setup.device, repeats)
                rows.append({"name": name, "evaluations": sched.unet_evaluations_per_image, "s_per_image": seconds,
                             "peak_gpu_mb": peak, "steps": 2 * sched.schedule.n})
                log(f"  {name}: {seconds:.3f} s/image")
                backend.close()
                del sched, backend
            except Exception as exc:  # one configuration's failure is a finding, not the end of the check
                rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"  {name}: FAILED {rows[-1]['error']}")
            gc.collect()
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    by = {r["name"]: r for r in rows}
    for inversion in ("exact", "single-pass"):
        eager = by.get(f"torch {precision} {inversion} eager")
        graph = by.get(f"torch {precision} {inversion} + CUDA graph")
        if eager and graph:
            graph["host_overhead_ms_per_step"] = (eager["s_per_image"] - graph["s_per_image"]) * 1e3 / graph["steps"]
    return rows


def capture_audit(setup: Setup, work: Path) -> dict[str, Any]:
    """What a CUDA graph capture needs of a program, checked on the device at hand (a CPU here): while it runs, no
    backend buffer is made, no value leaves for the host (`.item()`, data-dependent shapes), and two runs issue the
    same operations."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from r2r.models import EMBEDDED_DEFAULT, default_resolution
    from r2r.runtime.backend_torch import TorchBackend
    from r2r.runtime.scheduler import CoupledScheduler

    host_reads = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

    class Trace(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    w, h = default_resolution(EMBEDDED_DEFAULT)
    bundle = _bundle(EMBEDDED_DEFAULT, work / "bundles" / "embedded", w, h)
    backend = TorchBackend(bundle, EMBEDDED_DEFAULT, "cpu", "fp32")
    sched = CoupledScheduler(bundle, backend, 1, setup.method, Variant(fused=True))
    backend.upload(sched.image_in, np.zeros(sched.image_in.shape, np.float32))
    made = backend.allocations
    traces = []
    for _ in range(2):
        with Trace() as trace:
            backend.execute(sched.plan.ops, key="audit")
        traces.append(trace.ops)
    return {"ops_per_run": len(traces[0]), "same_ops_every_run": traces[0] == traces[1],
            "host_reads": sorted({op for op in traces[0] if op in host_reads}),
            "buffers_made_inside": backend.allocations - made, "torch": torch.__version__}


def run(out: Path, quick: bool = False, repeats: int = 2) -> dict[str, Any]:
    import torch

    from r2r.benchmarks.sd15 import build_sd15_architecture
    from r2r.machine import describe_machine
    from r2r.models import EMBEDDED_DEFAULT, default_resolution

    cuda = torch.cuda.is_available()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    method = Method(steps=10, strength=0.5) if quick else Method()
    if cuda:
        setup = Setup("cuda", 768, 1024, method, ("fp32", "bf16", "fp16"))
        log(f"r2r-bench gpu-check: {torch.cuda.get_device_name()}; parity on the embedded default")
    else:
        w, h = default_resolution(EMBEDDED_DEFAULT)
        setup = Setup("cpu", w, h, method, ("fp32", "bf16"))
        log("r2r-bench gpu-check: no CUDA device: the CPU rehearsal (embedded default); parity")
    report: dict[str, Any] = {"machine": describe_machine(), "torch": torch.__version__, "python":
                              platform.python_version(), "device": setup.device,
                              "rehearsal": not cuda, "method": setup.method.as_dict()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    def save() -> None:  # after every section: a check cut short by its time limit still leaves its figures
        report["wall_s"] = time.perf_counter() - start
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))

    report["parity"] = parity(setup, work)
    save()
    if cuda:
        log("r2r-gpu-check: building the SD 1.5-architecture model (random weights) at 768x1024")
        model = build_sd15_architecture(work / "models" / "sd15-random", width=768, height=1024)
        report["timing_model"] = "SD 1.5 architecture, seeded random weights, 768x1024"
    else:
        model = EMBEDDED_DEFAULT
        report["timing_model"] = f"embedded default, {setup.width}x{setup.height} (rehearsal)"
    report["timings"] = timings(setup, model, work, repeats)
    save()
    if not cuda:
        report["capture_audit"] = capture_audit(setup, work)
    report["other_backends"] = {name: ("imports; not run by this check" if importlib.util.find_spec(mod) else
                                       "not installed: not run")
                                for name, mod in (("tensorrt", "tensorrt"), ("onnxruntime-gpu", "onnxruntime"))}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            report["other_backends"]["onnxruntime-gpu"] = "onnxruntime has no CUDA provider here: not run"
    save()
    (out / "report.md").write_text(markdown(report))
    log(f"r2r-bench gpu-check: done in {report['wall_s']:.0f} s -> {out / 'report.md'}")
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = report.get("gpu")
    lines = [
        "# r2r-bench gpu-check" + (" (CPU rehearsal: no GPU, no GPU figure)" if report["rehearsal"] else ""),
        "",
        (f"GPU: {gpu['name']} ({gpu['memory_gib']} GiB, compute capability {gpu['capability']}, CUDA "
         f"{gpu['cuda']}); " if gpu else "") + f"CPU: {m['cpu'].get('model', '?')}, {m['logical_cpus']} logical "
        f"CPUs; torch {report['torch']}, Python {report['python']}.  ",
        f"Method: {report['method']}; wall {report['wall_s']:.0f} s.",
        "",
        "## Parity: the torch backend against the PyTorch reference (CPU, fp32), embedded default, one image",
        "",
        "| device | precision | PSNR (dB) | max abs error |",
        "|---|---|---|---|",
    ]
    for r in report["parity"]:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['precision']} | failed: {r['error']} | - |")
            continue
        db = "identical" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['device']} | {r['precision']} | {db} | {r['max_abs_error']} |")
    lines += ["", f"## Time per image: {report['timing_model']}", "",
              "| configuration | UNet evals / image | s / image (min) | peak GPU MB | host overhead per step (ms) |",
              "|---|---|---|---|---|"]
    for r in report["timings"]:
        if "error" in r:
            lines.append(f"| {r['name']} | - | failed: {r['error']} | - | - |")
            continue
        peak = "-" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
        host = r.get("host_overhead_ms_per_step")
        lines.append(f"| {r['name']} | {r['evaluations']:.0f} | {r['s_per_image']:.3f} | {peak} | "
                     f"{'-' if host is None else f'{host:.2f}'} |")
    if "capture_audit" in report:
        a = report["capture_audit"]
        lines += ["", f"Capture audit of the fused program (CPU): {a['ops_per_run']} operations per run, same "
                  f"operations every run: {a['same_ops_every_run']}, host reads: {a['host_reads'] or 'none'}, "
                  f"buffers made inside: {a['buffers_made_inside']}."]
    lines += ["", "Other backends: " + "; ".join(f"{k}: {v}" for k, v in report["other_backends"].items()) + "."]
    return "\n".join(lines) + "\n"


__all__ = ["capture_audit", "markdown", "parity", "run", "timings"]
