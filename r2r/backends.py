"""The backend table (docs/design.md, "Backends"): one row per execution backend.

`r2r-export build-engines`, `r2r-run`, `r2r-bench` and the automatic selection all read it: which devices and
precisions a backend takes, its default precision, where its engines live in the bundle's manifest, and the two
modules that implement it. Adding a backend is one row here plus its own files: a builder module in
`r2r.engines` (`build(bundle, BuildRequest, progress)`) and a runtime module in `r2r.runtime`
(`available_devices()`, `open_backend(bundle, device, precision, threads)`).

The rows name those modules instead of importing them: `r2r/` is imported by every stage and imports none. The
engines CLI imports a row's builder, the runtime its runtime module (`tests/test_layers.py` checks that both
exist and sit in the stage they belong to).
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")  # every precision some backend takes (CLI choices)
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BackendRow:
    name: str
    devices: tuple[str, ...]  # in the order `--device auto` tries them
    precisions: tuple[str, ...]  # what it builds and runs, best first
    default_precision: str | None  # None: the best precision the bundle has engines of (engines are per GPU)
    engine_slot: str  # manifest.engines key of one build: "{device}", "{precision}", "{graph}" filled in
    builder: str  # module in r2r.engines: build(bundle, BuildRequest, progress) -> list[EngineEntry]
    runtime: str  # module in r2r.runtime: available_devices(), open_backend(bundle, device, precision, threads)
    install: str  # what installs it
    needs_engines: bool = False  # runs only from built engines, never from the ONNX graphs
    auto: bool = True  # a candidate of `--backend auto` (in table order)

    def slot(self, device: str, precision: str, graph: str) -> str:
        return self.engine_slot.format(device=device, precision=precision, graph=graph)

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise ValueError(f"--precision {precision}: the {self.name} backend takes {', '.join(self.precisions)}")
        return precision

    def check_device(self, device: str) -> str:
        if device not in self.devices:
            raise ValueError(f"--device {device}: the {self.name} backend runs on {' or '.join(self.devices)}")
        return device


BACKENDS: tuple[BackendRow, ...] = (
    BackendRow("tensorrt", ("cuda",), ("fp16", "bf16", "fp8", "int8", "fp32"), None, "tensorrt/{precision}/{graph}",
               "r2r.engines.tensorrt", "r2r.runtime.backend_trt",
               "pip install 'r2r[gpu]' on a machine with an NVIDIA GPU", needs_engines=True),
    BackendRow("onnxruntime", ("cuda", "cpu"), ("fp32",), "fp32", "onnxruntime/{device}-{precision}/{graph}",
               "r2r.engines.onnxruntime", "r2r.runtime.backend_ort",
               "onnxruntime comes with r2r; for CUDA: pip install 'r2r[gpu]' (onnxruntime-gpu)"),
    BackendRow("openvino", ("cpu",), ("fp32", "bf16"), "fp32", "openvino/{device}-{precision}/all",
               "r2r.engines.openvino", "r2r.runtime.backend_ov", "pip install 'r2r[openvino]'", auto=False),
)
NAMES = tuple(row.name for row in BACKENDS)


def backend_row(name: str) -> BackendRow:
    for row in BACKENDS:
        if row.name == name:
            return row
    raise ValueError(f"backend {name!r}: choose one of {', '.join(NAMES)}")


@dataclass(frozen=True)
class BuildRequest:
    """What `r2r-export build-engines` asks of a row's builder."""

    precision: str
    device: str
    batches: tuple[int, ...] = (1,)  # the image batches the runtime will run (OpenVINO compiles at exact shapes)
    opt_level: int = 3  # TensorRT builder optimization level (0-5)
    refit: bool = False  # TensorRT: refittable engines


__all__ = ["BACKENDS", "DEVICES", "NAMES", "PRECISIONS", "BackendRow", "BuildRequest", "backend_row"]
