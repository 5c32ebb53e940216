"""ONNX Runtime backend: IO binding onto buffers allocated once, numpy scheduler updates in place.

Each prepared call owns an IOBinding whose inputs and outputs point at the scheduler's buffers, so a
step is `run_with_iobinding` plus a few ufuncs with `out=`: no array is created in the loop and the
emit graph writes Q/K straight into the memory the inject graph reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from r2r.engines.onnxruntime import open_session
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend, DeviceArray, HostBackend, Op
from r2r.runtime.ort_session import CPU_PROVIDER, element_type, graph_source, require_cuda


class OrtBackend(HostBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32", threads: int = 0) -> None:
        if device != "cpu":
            raise ValueError(f"OrtBackend binds host memory; device {device!r} needs the device-resident backend "
                             "(r2r.runtime.backend_ort_device.OrtDeviceBackend, chosen by open_backend)")
        super().__init__()
        import onnxruntime as ort

        self.ort = ort
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.threads = threads or (os.cpu_count() or 1)
        self._sessions: dict[str, object] = {}
        self._plain: set[str] = set()  # graphs whose optimized engine missed its canary: the bundle's graph instead

    def session(self, graph: str) -> object:
        if graph not in self._sessions:
            path, preoptimized = graph_source(self.bundle, graph, self.device, self.precision, graph in self._plain)
            self._sessions[graph] = open_session(self.ort, path, self.threads, [CPU_PROVIDER], preoptimized)
        return self._sessions[graph]

    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        sess = self.session(graph)
        binding = sess.io_binding()
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        missing = [n for n in names_in + names_out if n not in bindings]
        if missing:
            raise KeyError(f"{graph}: no buffer bound for {missing}")
        for name in names_in:
            a = bindings[name]
            binding.bind_input(name, "cpu", 0, element_type(a.dtype), list(a.shape), a.ptr)
        for name in names_out:
            a = bindings[name]
            binding.bind_output(name, "cpu", 0, element_type(a.dtype), list(a.shape), a.ptr)
        self._keep.append((graph, binding, dict(bindings)))  # the buffers must live as long as the binding
        run = sess.run_with_iobinding

        def op() -> None:
            run(binding)

        return op

    def discard(self, graph: str) -> str:
        self._sessions.pop(graph, None)
        self._keep = [k for k in self._keep if k[0] != graph]
        engine = graph_source(self.bundle, graph, self.device, self.precision)[1]
        self._plain.add(graph)
        return ("opening the bundle's graph instead of its optimized engine (rebuild it with `r2r-export "
                f"build-engines --backend onnxruntime --out {self.bundle.root}`)" if engine else "")

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "onnxruntime": self.ort.__version__, "threads": str(self.threads)}


def open_backend(bundle: Bundle, device: str, precision: str, threads: int = 0,
                 model: Path | None = None) -> Backend:
    """The backend table's runtime entry: host buffers on the CPU provider, device-resident buffers (and CUDA
    graphs) on the CUDA provider."""
    if device == "cuda":
        import onnxruntime as ort

        from r2r.runtime.backend_ort_device import OrtDeviceBackend

        require_cuda(ort)
        return OrtDeviceBackend(bundle, "cuda", precision=precision, threads=threads)
    return OrtBackend(bundle, device, precision=precision, threads=threads)
