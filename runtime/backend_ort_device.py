"""ONNX Runtime backend with device-resident buffers: the CUDA provider with one CUDA graph per prepared call.

Buffers are OrtValues on the session's device, bound once by address, so nothing is copied between calls; sessions
share one non-blocking stream, updates are the bundle's step graphs, and only upload / download (outside a program)
wait. On "cpu" the same class runs on host OrtValues: CI checks its bindings and numbers against `OrtBackend`.
Why: docs/design.md, "Backends".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from r2r.engines.onnxruntime import open_session
from r2r.gpu import cuda_check, import_cudart
from r2r.log import log
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Buffers, DeviceArray, Op, StepGraphBackend
from r2r.runtime.ort_session import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    cuda_provider_options,
    cuda_run_config,
    element_type,
    free_dims,
    graph_source,
    refuses_capture,
    require_cuda,
    run_options,
)

DEVICES = ("cpu", "cuda")
COPY_GRAPH = "device_copy"  # not a bundle graph: Identity over a flat tensor, see identity_model()
_IO_OPSET, _IO_IR_VERSION = 17, 10  # Identity is unchanged since opset 16; IR 10 is what onnxruntime 1.18 loads


def identity_model(dtype: np.dtype) -> bytes:
    """y = x over a flat tensor of `dtype`: a device-to-device copy that runs (and is captured) like any call."""
    from onnx import helper

    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], COPY_GRAPH,
                              [helper.make_tensor_value_info("x", onnx_type, ["n"])],
                              [helper.make_tensor_value_info("y", onnx_type, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _IO_OPSET)], ir_version=_IO_IR_VERSION)
    return model.SerializeToString()


@dataclass(frozen=True)
class PreparedCall:
    """One bound graph call: what it reads and writes, and the CUDA graph that records it (None on CPU)."""

    graph: str
    bindings: dict[str, DeviceArray]
    graph_id: int | None


class OrtDeviceBackend(StepGraphBackend):
    """The bundle's graphs on ONNX Runtime, bound to OrtValues on `device` ("cuda": the CUDA provider, with CUDA
    graphs unless `cuda_graph` is False; "cpu": the CPU provider). `cudart`: cuda-python's runtime (or a stand-in)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cuda", precision: str = "fp32", threads: int = 0,
                 device_id: int = 0, cudart: ModuleType | None = None, cuda_graph: bool = True) -> None:
        import onnxruntime as ort

        if device not in DEVICES:
            raise ValueError(f"onnxruntime device {device!r}: choose {', '.join(DEVICES)}")
        self.ort, self.bundle, self.device, self.precision = ort, bundle, device, precision
        self.device_id = device_id
        self.threads = threads or (os.cpu_count() or 1)
        self.cuda_graph = cuda_graph and device == "cuda"
        self.buffers = Buffers()  # base address -> the OrtValue that owns it
        self.allocations = 0  # OrtValues created by this backend (the loop must not add any)
        self.prepared: list[PreparedCall] = []
        self._sessions: dict[tuple, Any] = {}  # (session key, captured) -> session (None: capture refused)
        self._modes: dict[str, str] = {}  # graph -> "dynamic" | "fixed" (batch) | "uncaptured"
        self._graph_ids: dict[tuple, int] = {}  # per session: the last gpu_graph_id handed out
        self._closed = False
        self._calls: dict[tuple, Op] = {}
        self._keep: list[object] = []  # IOBindings and RunOptions live as long as the backend
        self._plain: set[str] = set()  # graphs whose optimized engine missed its canary: the bundle's graph instead
        self._unsynced = False  # host writes (zeroing, uploads) not yet waited for
        self.cudart: ModuleType | None = None
        self._stream: Any = None
        if device == "cuda":
            require_cuda(ort)
            self.cudart = cudart or import_cudart()
            rt = self.cudart
            self._stream = self._cuda("cudaStreamCreateWithFlags",
                                      rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    def _cuda(self, fn: str, result: tuple) -> Any:
        return cuda_check(self.cudart, fn, result)  # type: ignore[arg-type]

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("the ONNX Runtime device backend is closed")

    def __enter__(self) -> OrtDeviceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- memory -----------------------------------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """The one place OrtValues are made."""
        self._require_open()
        self.allocations += 1
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), element_type(dtype), self.device,
                                                              self.device_id)

    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> DeviceArray:
        shape, dt = tuple(int(s) for s in shape), np.dtype(dtype)
        value = self._allocate(shape, dt)
        value.update_inplace(np.zeros(shape, dt))  # deterministic contents, as HostBackend's np.zeros
        self._unsynced = True
        ptr = int(value.data_ptr())
        self.buffers.add(ptr, int(np.prod(shape)) * dt.itemsize, value)
        return DeviceArray(ptr, shape, dt, None)

    def _owner(self, a: DeviceArray, what: str) -> tuple[Any, int]:
        """(owning OrtValue, byte offset of `a` in it)."""
        self._require_open()
        found = self.buffers.owner(a) if isinstance(a, DeviceArray) else None
        if found is None:
            raise ValueError(f"{what}: {a!r} is not memory of this ONNX Runtime backend (make buffers with its "
                             "empty())")
        base, value = found
        return value, a.ptr - base

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        """Host -> device, outside the loop: the whole OrtValue in place (a view: its owner, read-modify-write)."""
        value, offset = self._owner(dst, "upload")
        host = np.asarray(src)
        if host.size != int(np.prod(dst.shape)):
            raise ValueError(f"upload: {host.shape} into a buffer of shape {dst.shape}")
        host = np.ascontiguousarray(host.reshape(dst.shape).astype(dst.dtype, casting="same_kind", copy=False))
        self.synchronize()  # work still reading the buffer finishes first
        if offset or dst.shape != tuple(value.shape()):
            whole = np.array(value.numpy(), copy=True)
            whole.reshape(-1).view(np.uint8)[offset:offset + dst.nbytes] = host.reshape(-1).view(np.uint8)
            host = whole
        value.update_inplace(host)
        self._unsynced = True  # waited for before the next program (execute)

    def download(self, src: DeviceArray) -> np.ndarray:
        """Device -> host after all enqueued work: the one place, with upload and synchronize, that waits."""
        value, offset = self._owner(src, "download")
        self.synchronize()
        whole = np.ascontiguousarray(value.numpy()).reshape(-1).view(np.uint8)
        return whole[offset:offset + src.nbytes].view(src.dtype).reshape(src.shape).copy()

    def synchronize(self) -> None:
        """Wait for the device: the shared stream and ONNX Runtime's own copies (CPU: runs are synchronous)."""
        if self.device == "cuda":
            self._cuda("cudaDeviceSynchronize", self.cudart.cudaDeviceSynchronize())  # type: ignore[union-attr]
        self._unsynced = False

    def execute(self, program: Sequence[Op], key: object) -> None:
        """The ops in order, with no wait between them; host writes made since the last wait land first."""
        if self._unsynced:
            self.synchronize()
        for op in program:
            op()

    def close(self) -> None:
        """Release sessions and buffers, then the stream (after the device is idle); held ops refuse to run."""
        if self._closed:
            return
        if self._stream is not None:
            self.synchronize()
        self._closed = True
        self._calls.clear()
        self._keep.clear()
        self._sessions.clear()
        self.buffers.clear()
        if self._stream is not None:
            self._cuda("cudaStreamDestroy", self.cudart.cudaStreamDestroy(self._stream))  # type: ignore[union-attr]
            self._stream = None

    # -- sessions ---------------------------------------------------------------------------------------------------
    def _source(self, graph: str) -> tuple[Path | bytes, bool, list[tuple[str, list[int | str]]]]:
        """(model, pre-optimized, input specs with their named dimensions)."""
        if graph.startswith(f"{COPY_GRAPH}/"):
            return identity_model(np.dtype(graph.split("/", 1)[1])), False, [("x", ["n"])]
        path, preoptimized = graph_source(self.bundle, graph, self.device, self.precision, graph in self._plain)
        return path, preoptimized, [(t.name, list(t.shape)) for t in self.bundle.manifest.graphs[graph].inputs]

    def _open(self, key: tuple, model: Path | bytes, preoptimized: bool, dims: dict[str, int] | None,
              capture: bool) -> Any:
        """A cached session; None when ONNX Runtime refuses to capture it."""
        if (key, capture) not in self._sessions:
            if self.device == "cuda":
                providers = [(CUDA_PROVIDER, cuda_provider_options(self.device_id, int(self._stream), capture))]
            else:
                providers = [CPU_PROVIDER]
            try:
                sess = open_session(self.ort, model, self.threads, providers, preoptimized, dims)
            except Exception as exc:  # ORT's pybind errors derive from Exception only
                if not (capture and refuses_capture(exc)):
                    raise
                sess = None
            self._sessions[(key, capture)] = sess
        return self._sessions[(key, capture)]

    def session_for(self, graph: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Any, tuple, bool]:
        """(session, its key, captured) for a call of `graph` at these shapes.

        CPU, or CUDA graphs off: one session per graph. CUDA: one session per graph if ONNX Runtime accepts to
        capture it with its dynamic batch; else one per batch with the named dimensions fixed (free dimension
        overrides, so the optimizer folds the shape arithmetic ONNX Runtime would place on the CPU, which capture
        refuses); else, with a warning, one per graph run uncaptured (still on the shared stream, unsynchronized)."""
        model, preoptimized, inputs = self._source(graph)
        mode = self._modes.setdefault(graph, "dynamic" if self.cuda_graph else "uncaptured")
        if mode == "dynamic":
            sess = self._open((graph,), model, preoptimized, None, capture=True)
            if sess is not None:
                return sess, (graph,), True
            mode = self._modes[graph] = "fixed"
        if mode == "fixed":
            dims = free_dims(inputs, shapes)
            key = (graph, *sorted(dims.items()))
            sess = self._open(key, model, preoptimized, dims, capture=True)
            if sess is not None:
                return sess, key, True
            log(f"r2r: onnxruntime refuses to capture {graph} as a CUDA graph even at a fixed batch; its calls run "
                "uncaptured")
            self._modes[graph] = "uncaptured"
        return self._open((graph,), model, preoptimized, None, capture=False), (graph,), False

    def precision_of(self, graph: str) -> str:
        """fp32 on CUDA runs matrix products in TF32 (the CUDA provider's default)."""
        return "tf32" if self.precision == "fp32" and self.device == "cuda" else self.precision

    def discard(self, graph: str) -> str:
        """Drop the graph's sessions and prepared calls; it opens again from the bundle's own graph."""
        self._sessions = {k: v for k, v in self._sessions.items() if k[0][0] != graph}
        self._calls = {k: v for k, v in self._calls.items() if k[0][0] != graph}
        self._modes.pop(graph, None)
        engine = graph_source(self.bundle, graph, self.device, self.precision, graph in self._plain)[1]
        self._plain.add(graph)
        return ("opening the bundle's graph instead of its optimized engine (rebuild it with `r2r-export "
                f"build-engines --backend onnxruntime --out {self.bundle.root}`)" if engine else "")

    # -- calls ------------------------------------------------------------------------------------------------------
    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        """Bind every input and output of `graph` to device addresses, once; the op is one run_with_iobinding
        (on CUDA: its own CUDA graph where ONNX Runtime captures the session, and no synchronization)."""
        for name, a in bindings.items():
            self._owner(a, f"onnxruntime {graph}: {name}")
        sess, skey, captured = self.session_for(graph, {n: a.shape for n, a in bindings.items()})
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        missing = [n for n in names_in + names_out if n not in bindings]
        if missing:
            raise KeyError(f"onnxruntime {graph}: no buffer bound for {missing}")
        extra = sorted(set(bindings) - set(names_in) - set(names_out))
        if extra:
            raise KeyError(f"onnxruntime {graph}: the graph has no tensors {extra}")
        key = (skey, tuple((n, bindings[n].ptr, bindings[n].shape, bindings[n].dtype) for n in names_in + names_out))
        if key in self._calls:  # the same call prepared twice: one binding (and one CUDA graph) serves both
            return self._calls[key]
        binding = sess.io_binding()
        dev, dev_id = self.device, self.device_id
        for name in names_in:
            a = bindings[name]
            binding.bind_input(name, dev, dev_id, element_type(a.dtype), list(a.shape), a.ptr)
        for name in names_out:
            a = bindings[name]
            binding.bind_output(name, dev, dev_id, element_type(a.dtype), list(a.shape), a.ptr)
        graph_id = None
        if captured:  # ids per session, from 1: 0 is ONNX Runtime's default graph
            graph_id = self._graph_ids[skey] = self._graph_ids.get(skey, 0) + 1
        ro = run_options(self.ort, cuda_run_config(graph_id) if self.device == "cuda" else {})
        self._keep.append((binding, ro))
        self.prepared.append(PreparedCall(graph, dict(bindings), graph_id))
        run, be = sess.run_with_iobinding, self

        def op() -> None:
            if be._closed:  # its stream and buffers are gone
                be._require_open()
            run(binding, ro)

        self._calls[key] = op
        return op

    def copy(self, dst: DeviceArray, src: DeviceArray) -> Op:
        """Device-to-device: the Identity graph over the flat buffers (bit-exact, on the stream, captured)."""
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"copy: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
        n = (int(np.prod(src.shape)),)
        return self.call(f"{COPY_GRAPH}/{src.dtype.name}", {"x": DeviceArray(src.ptr, n, src.dtype),
                                                            "y": DeviceArray(dst.ptr, n, dst.dtype)})

    def describe(self) -> dict[str, str]:
        info = {"backend": self.name, "device": self.device, "precision": self.precision,
                "onnxruntime": self.ort.__version__, "threads": str(self.threads), "buffers": "device (OrtValue)"}
        if self.device == "cuda":
            uncaptured = sorted(g for g, m in self._modes.items() if m == "uncaptured")
            info["cuda_graphs"] = ("off" if not self.cuda_graph else
                                   "per call" + (f" (not {', '.join(uncaptured)})" if uncaptured else ""))
        return info


__all__ = ["COPY_GRAPH", "DEVICES", "OrtDeviceBackend", "PreparedCall", "identity_model"]
