"""OpenVINO backend for Intel/AMD CPUs: one compiled model per graph (dynamic batch), zero-copy tensors, bf16 option.

Each prepared call has its own infer request whose input and output tensors wrap the scheduler's numpy buffers
(shared memory), so a step is `infer()` plus in-place ufuncs, as on ONNX Runtime. Each graph is compiled once with
its batch dynamic (`r2r.engines.openvino.compile_graph`, the build's own definition): the routed UNet's calls at
B, 2B and 3B share one compiled model, one copy of the weights. The compiled blobs are cached in the bundle, one
folder per graph, precision, thread count, OpenVINO version and CPU (engines/openvino/cache/<graph>-...), so a built
bundle loads instead of compiling, and never loads a blob made for another configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r2r import graph_io
from r2r.engines.openvino import ROW, compile_graph, default_threads, drop_cache, import_openvino
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend, DeviceArray, HostBackend, Op


class OpenVinoBackend(HostBackend):
    name = "openvino"

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int = 0) -> None:
        super().__init__()
        ROW.check_precision(precision)
        self.ov = import_openvino()
        self.bundle, self.precision = bundle, precision
        self.threads = threads or default_threads()
        self._compiled: dict[str, Any] = {}
        self._uncached: set[str] = set()  # graphs whose bad blob could not be removed: compiled in memory

    def compiled(self, graph: str) -> Any:
        if graph not in self._compiled:
            self._compiled[graph] = compile_graph(self.ov, self.bundle.root, self.bundle.manifest, graph,
                                                  self.precision, self.threads, cache=graph not in self._uncached)
        return self._compiled[graph]

    def precision_of(self, graph: str) -> str:
        """int8 runs the quantized UNet; the other graphs at the CPU's native float precision."""
        return self.precision if self.precision != "int8" or graph == graph_io.UNET else ROW.native_precision()

    def discard(self, graph: str) -> str:
        self._compiled.pop(graph, None)
        self._keep = [k for k in self._keep if k[0] != graph]  # the infer requests that hold the compiled model
        try:
            folder = drop_cache(self.bundle.root, self.bundle.manifest, graph, self.precision, self.threads,
                                self.ov.__version__)
        except OSError as exc:  # a read-only bundle: the blob stays; this process compiles the graph itself
            self._uncached.add(graph)
            return f"its compiled blob cannot be removed ({exc}): compiling it again in memory"
        return f"removed its compiled blob ({folder.name}) to compile it again"

    @staticmethod
    def _name(port: Any, bindings: Mapping[str, DeviceArray], graph: str) -> str:
        """A port may carry several tensor names; the contract's is the one bound."""
        names = [n for n in port.get_names() if n in bindings]
        if not names:
            raise KeyError(f"{graph}: no buffer bound for {sorted(port.get_names())}")
        return names[0]

    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        compiled = self.compiled(graph)
        req = compiled.create_infer_request()
        for i, port in enumerate(compiled.inputs):
            req.set_input_tensor(i, self.ov.Tensor(bindings[self._name(port, bindings, graph)].host,
                                                   shared_memory=True))
        for i, port in enumerate(compiled.outputs):
            req.set_output_tensor(i, self.ov.Tensor(bindings[self._name(port, bindings, graph)].host,
                                                    shared_memory=True))
        self._keep.append((graph, req, dict(bindings)))
        infer = req.infer

        def op() -> None:
            infer()

        return op

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "precision": self.precision, "openvino": self.ov.__version__,
                "threads": str(self.threads)}


def open_backend(bundle: Bundle, device: str, precision: str, threads: int = 0,
                 model: Path | None = None) -> Backend:
    """The backend table's runtime entry."""
    return OpenVinoBackend(bundle, precision, threads)
