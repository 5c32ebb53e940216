"""The backend table (docs/design.md, "Backends"): one row per execution backend.

`r2r-export build-engines`, `r2r-run`, `r2r-bench` and the automatic selection all read it: which devices and
precisions a backend takes, which of its precisions the CPU runs natively, where its engines live in the bundle's
manifest, how to tell whether it can run here, and the two modules that implement it. Adding a backend is one row
here plus its own files: a builder module in `r2r.engines` (`build(bundle, BuildRequest, progress)`) and a runtime
module in `r2r.runtime` (`open_backend(bundle, device, precision, threads)`).

The rows name those modules instead of importing them: `r2r/` is imported by every stage and imports none. The
engines CLI imports a row's builder, the runtime its runtime module (`tests/test_layers.py` checks that both
exist and sit in the stage they belong to).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from r2r.errors import FlagError
from r2r.machine import cpu_flags

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")  # every precision some backend takes (CLI choices)
DEVICES = ("cpu", "cuda")


def _tensorrt_devices() -> tuple[str, ...]:
    from r2r.gpu import tensorrt_usable

    return ("cuda",) if tensorrt_usable() else ()


def _onnxruntime_devices() -> tuple[str, ...]:
    import onnxruntime as ort

    return ("cuda", "cpu") if "CUDAExecutionProvider" in ort.get_available_providers() else ("cpu",)


def _openvino_devices() -> tuple[str, ...]:
    return ("cpu",) if importlib.util.find_spec("openvino") is not None else ()


def _torch_devices() -> tuple[str, ...]:
    import torch

    return ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",)


@dataclass(frozen=True)
class BackendRow:
    name: str
    devices: tuple[str, ...]  # in the order `--device auto` tries them
    precisions: tuple[str, ...]  # what it builds and runs, best first
    engine_slot: str  # manifest.engines key of one build: "{device}", "{precision}", "{graph}" filled in
    builder: str | None  # module in r2r.engines: build(bundle, BuildRequest, progress); None: nothing to build
    runtime: str  # module in r2r.runtime: open_backend(bundle, device, precision, threads, model)
    install: str  # what installs it
    available: Callable[[], tuple[str, ...]]  # the devices it can run on here
    needs_engines: bool = False  # runs only from built engines; its default precision: the best built
    # precision -> CPU flags of which one must be present for the precision to run natively (else it is emulated)
    native: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    device_default: Mapping[str, str] = field(default_factory=dict)  # a device's default precision, where fixed
    graphs: bool = True  # runs the bundle's ONNX graphs (False: only its manifest and conditioning)
    library: str = ""  # the module whose version its engines depend on (first-use verdicts are keyed by it)
    step_devices: tuple[str, ...] = ()  # devices where the scheduler updates are the bundle's step graphs
    caches_on_open: bool = False  # opening a graph compiles it into a cache a later open loads instead

    def slot(self, device: str, precision: str, graph: str) -> str:
        return self.engine_slot.format(device=device, precision=precision, graph=graph)

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise FlagError(f"--precision {precision}: the {self.name} backend takes {', '.join(self.precisions)}")
        return precision

    def check_device(self, device: str) -> str:
        if device not in self.devices:
            raise FlagError(f"--device {device}: the {self.name} backend runs on {' or '.join(self.devices)}")
        return device

    def native_precision(self, flags: frozenset[str] | None = None, device: str = "cpu") -> str:
        """The device's default precision if the row fixes one, else the best precision this machine's CPU runs
        natively (BF16 needs AVX512-BF16 or AMX)."""
        if device in self.device_default:
            return self.device_default[device]
        have = cpu_flags() if flags is None else flags
        for p in self.precisions:
            need = self.native.get(p, ())
            if not need or any(f in have for f in need):
                return p
        return self.precisions[-1]


BACKENDS: tuple[BackendRow, ...] = (
    BackendRow(name="tensorrt", devices=("cuda",), precisions=("fp16", "bf16", "fp8", "int8", "fp32"),
               engine_slot="tensorrt/{precision}/{graph}", builder="r2r.engines.tensorrt",
               runtime="r2r.runtime.backend_trt", install="pip install 'r2r[gpu]' on a machine with an NVIDIA GPU",
               available=_tensorrt_devices, needs_engines=True, library="tensorrt", step_devices=("cuda",)),
    BackendRow(name="onnxruntime", devices=("cuda", "cpu"), precisions=("fp32",),
               engine_slot="onnxruntime/{device}-{precision}/{graph}", builder="r2r.engines.onnxruntime",
               runtime="r2r.runtime.backend_ort",
               install="onnxruntime comes with r2r; for CUDA: pip install 'r2r[gpu]' (onnxruntime-gpu)",
               available=_onnxruntime_devices, library="onnxruntime", step_devices=("cuda",)),
    BackendRow(name="openvino", devices=("cpu",), precisions=("bf16", "fp32", "int8"),
               engine_slot="openvino/{device}-{precision}/{graph}", builder="r2r.engines.openvino",
               runtime="r2r.runtime.backend_ov", install="openvino comes with r2r (pip install openvino)",
               available=_openvino_devices, native={"bf16": ("avx512_bf16", "amx_bf16")}, library="openvino",
               caches_on_open=True),
    BackendRow(name="torch", devices=("cuda", "cpu"), precisions=("fp16", "bf16", "fp32"),
               engine_slot="torch/{device}-{precision}/{graph}", builder=None, runtime="r2r.runtime.backend_torch",
               install="torch comes with r2r (a CUDA or ROCm build of torch for a GPU)", available=_torch_devices,
               device_default={"cuda": "fp16", "cpu": "fp32"}, graphs=False, library="torch"),
)
NAMES = tuple(row.name for row in BACKENDS)
# What `--backend auto` tries, fastest first (measured: benchmarks/README.md): TensorRT on an NVIDIA GPU, ONNX
# Runtime's CUDA provider, the PyTorch backend on a GPU (CUDA graphs), OpenVINO on the CPU (bf16 where the CPU has
# BF16 units), ONNX Runtime on the CPU.
AUTO_ORDER: tuple[tuple[str, str], ...] = (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("torch", "cuda"),
                                           ("openvino", "cpu"), ("onnxruntime", "cpu"))


@dataclass(frozen=True)
class KnownIssue:
    """A backend at a precision known to give wrong images or to crash on some machines (docs/design.md, "Verified
    engines"): `auto` never picks it there, and asking for it by name is refused with the fix."""

    backend: str
    precision: str
    cpu_flags: tuple[str, ...]  # it applies on a CPU with any of these flags
    dynamic_sizes: bool  # True: only to bundles whose graphs take a range of sizes (static bundles are spared)
    what: str
    reference: str  # the upstream report
    fix: str  # what to run instead

    def applies(self, backend: str, precision: str, dynamic: bool, flags: frozenset[str]) -> bool:
        return (backend, precision) == (self.backend, self.precision) and any(f in flags for f in self.cpu_flags) \
            and (dynamic or not self.dynamic_sizes)

    def describe(self) -> str:
        return f"{self.backend} {self.precision} {self.what} ({self.reference}); {self.fix}"


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    # Deterministic SIGSEGV in the CPU plugin's JIT code on the first infer() of an INT8 model with any dynamic input
    # dimension, on Sapphire, Emerald and Granite Rapids Xeons; AMD and pre-AMX Xeons unaffected (reported against
    # OpenVINO 2026.1-2026.3, open). r2r's bundles are dynamic by default and its INT8 UNet is NNCF's.
    KnownIssue("openvino", "int8", ("amx_int8", "amx_tile"), True,
               "crashes (SIGSEGV) with dynamic input shapes on CPUs with AMX", "openvinotoolkit/openvino#37577",
               "use --precision bf16, or INT8 on a static bundle (`r2r-export onnx --static`)"),
)


def known_issue(backend: str, precision: str, dynamic: bool, flags: frozenset[str] | None = None
                ) -> KnownIssue | None:
    """The entry of KNOWN_ISSUES that `backend` at `precision` meets on this CPU (or `flags`), if any."""
    have = cpu_flags() if flags is None else flags
    return next((k for k in KNOWN_ISSUES if k.applies(backend, precision, dynamic, have)), None)


def backend_row(name: str) -> BackendRow:
    for row in BACKENDS:
        if row.name == name:
            return row
    raise FlagError(f"--backend {name}: choose one of {', '.join(NAMES)}")


def auto_choices(device: str = "auto") -> list[tuple[BackendRow, str]]:
    """The (row, device) pairs of AUTO_ORDER that can run here, on `device` ("auto": any), fastest first."""
    out = []
    for name, dev in AUTO_ORDER:
        row = backend_row(name)
        if device in ("auto", dev) and dev in row.available():
            out.append((row, dev))
    return out


@dataclass(frozen=True)
class BuildRequest:
    """What `r2r-export build-engines` asks of a row's builder."""

    precision: str
    device: str
    opt_level: int = 3  # TensorRT builder optimization level (0-5)
    refit: bool = False  # TensorRT: refittable engines
    static_size: bool = False  # TensorRT: a profile of the bundle's example size only
    model: Path | None = None  # the bundle's model, where a build calibrates on it (OpenVINO int8)
    embedding: Path | None = None


__all__ = ["AUTO_ORDER", "BACKENDS", "DEVICES", "KNOWN_ISSUES", "NAMES", "PRECISIONS", "BackendRow", "BuildRequest",
           "KnownIssue", "auto_choices", "backend_row", "known_issue"]
