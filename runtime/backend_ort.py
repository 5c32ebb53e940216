"""ONNX Runtime backend: IO binding onto buffers allocated once, numpy scheduler updates in place.

Each prepared call owns an IOBinding whose inputs and outputs point at the scheduler's buffers, so a
step is `run_with_iobinding` plus a few ufuncs with `out=`: no array is created in the loop and the
emit graph writes Q/K straight into the memory the inject graph reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from r2r.manifest import bundle_path
from r2r.runtime.bundle import Bundle
from r2r.runtime.device import DeviceArray, HostBackend, Op

_ORT_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.float16): np.float16, np.dtype(np.int64): np.int64}


class OrtBackend(HostBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 graph_paths: Mapping[str, Path] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.ort = ort
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.threads = threads or (os.cpu_count() or 1)
        self.graph_paths = dict(graph_paths or {})
        self._sessions: dict[str, object] = {}

    def session(self, graph: str) -> object:
        if graph not in self._sessions:
            ort = self.ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            slot = f"onnxruntime/{self.device}-{self.precision}/{graph}"
            engine = self.bundle.manifest.engines.get(slot)
            if graph in self.graph_paths:
                path = self.graph_paths[graph]
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            elif engine is not None:  # pre-optimized at build time
                path = bundle_path(self.bundle.root, engine.files[0])
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                path = self.bundle.graph_path(graph)
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = ["CUDAExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
            self._sessions[graph] = ort.InferenceSession(str(path), sess_options=so, providers=providers)
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
            binding.bind_input(name, "cpu", 0, _ORT_TYPES[a.dtype], list(a.shape), a.ptr)
        for name in names_out:
            a = bindings[name]
            binding.bind_output(name, "cpu", 0, _ORT_TYPES[a.dtype], list(a.shape), a.ptr)
        self._keep.append((binding, dict(bindings)))  # the buffers must live as long as the binding
        run = sess.run_with_iobinding

        def op() -> None:
            run(binding)

        return op

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "onnxruntime": self.ort.__version__, "threads": str(self.threads)}
