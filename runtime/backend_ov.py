"""OpenVINO backend for Intel/AMD CPUs: static-shape compiled models, zero-copy tensors, bf16 option.

Each prepared call has its own infer request whose input and output tensors wrap the scheduler's
numpy buffers (shared memory), so a step is `infer()` plus in-place ufuncs, as on ONNX Runtime.
Models are reshaped to the exact batch of the call and compiled once; compiled blobs are cached in
the bundle (engines/openvino/cache) so a second process loads instead of compiling.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from r2r.manifest import ENGINES_DIR, bundle_path
from r2r.runtime.bundle import Bundle
from r2r.runtime.device import DeviceArray, HostBackend, Op

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
CACHE_DIR = f"{ENGINES_DIR}/openvino/cache"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError("OpenVINO is not installed: pip install 'r2r[openvino]'") from exc
    return openvino


class OpenVinoBackend(HostBackend):
    name = "openvino"

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int = 0) -> None:
        super().__init__()
        if precision not in PRECISION_HINTS:
            raise ValueError(f"openvino precision {precision!r}: choose {', '.join(PRECISION_HINTS)}")
        self.ov = import_openvino()
        self.bundle, self.precision = bundle, precision
        self.threads = threads or (os.cpu_count() or 1)
        self.core = self.ov.Core()
        cache = bundle_path(bundle.root, CACHE_DIR)
        cache.mkdir(parents=True, exist_ok=True)
        self.core.set_property({"CACHE_DIR": str(cache)})
        self._models: dict[str, Any] = {}
        self._compiled: dict[tuple, Any] = {}

    def compiled(self, graph: str, shapes: Mapping[str, tuple[int, ...]]) -> Any:
        key = (graph, tuple(sorted(shapes.items())))
        if key not in self._compiled:
            if graph not in self._models:
                self._models[graph] = self.core.read_model(str(self.bundle.graph_path(graph)))
            model = self._models[graph].clone()
            model.reshape({name: self.ov.PartialShape(list(shape)) for name, shape in shapes.items()})
            config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision],
                      "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            self._compiled[key] = self.core.compile_model(model, "CPU", config)
        return self._compiled[key]




    @staticmethod
    def _name(port: Any, bindings: Mapping[str, DeviceArray], graph: str) -> str:
        """A port may carry several tensor names; the contract's is the one bound."""
        names = [n for n in port.get_names() if n in bindings]
        if not names:
            raise KeyError(f"{graph}: no buffer bound for {sorted(port.get_names())}")
        return names[0]

    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        if graph not in self._models:
            self._models[graph] = self.core.read_model(str(self.bundle.graph_path(graph)))
        ins = [self._name(p, bindings, graph) for p in self._models[graph].inputs]
        compiled = self.compiled(graph, {n: bindings[n].shape for n in ins})
        req = compiled.create_infer_request()
        for i, port in enumerate(compiled.inputs):
            req.set_input_tensor(i, self.ov.Tensor(bindings[self._name(port, bindings, graph)].host,
                                                            shared_memory=True))
        for i, port in enumerate(compiled.outputs):
            req.set_output_tensor(i, self.ov.Tensor(bindings[self._name(port, bindings, graph)].host,
                                                             shared_memory=True))
        self._keep.append((req, dict(bindings)))
        infer = req.infer

        def op() -> None:
            infer()

        return op

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "precision": self.precision, "openvino": self.ov.__version__,
                "threads": str(self.threads)}
