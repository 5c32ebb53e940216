"""TensorRT backend: the bundle's engines on one CUDA stream, each batch's program replayed as one CUDA graph.

`empty` is the only allocation, `upload` / `download` the only copies and, with `synchronize`, the only waits; each
prepared call owns an execution context whose shapes and addresses are set once; a program runs once uncaptured,
then is captured and later launched as one graph. A failing cuda-python call raises `CudaError` naming it.
Why: docs/design.md, "The GPU path".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from r2r.engines.tensorrt import EngineCompatError, check_engine_compat, engine_entry_key, rebuild_command
from r2r.gpu import CudaError, cuda_check, gpu_info, import_cudart, import_tensorrt
from r2r.manifest import bundle_path
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend, Buffers, DeviceArray, Op, StepGraphBackend

# TensorRT DataType member -> numpy dtype (bf16, fp8, int4, fp4 have no numpy type: such I/O is refused)
_NP_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}


@dataclass(frozen=True)
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype | None  # None: a type numpy cannot hold
    trt_dtype: str
    shape: tuple[int, ...]  # -1 for dynamic dims
    profile: tuple[tuple[int, ...], tuple[int, ...]] | None  # (min, max) of optimization profile 0, for inputs


@dataclass
class _Engine:
    graph: str
    path: Path
    engine: Any
    tensors: dict[str, _Tensor]


@dataclass
class _Context:
    graph: str
    context: Any
    memory_size: int  # update_device_memory_size_for_shapes() for its shapes
    memory_bound: int = 0  # address of the activation buffer set on it (0: none yet)
    bindings: dict[str, DeviceArray] = field(default_factory=dict)


@dataclass
class _Captured:
    program: Sequence[Op]  # held, so that its identity cannot be reused by another program
    length: int
    graph_exec: Any


class _Enqueue:
    """One prepared engine call: `execute_async_v3` of its own context on the backend's stream."""

    __slots__ = ("backend", "ctx")

    def __init__(self, backend: TrtBackend, ctx: _Context) -> None:
        self.backend, self.ctx = backend, ctx

    def __call__(self) -> None:
        be, ctx = self.backend, self.ctx
        if ctx.context is None:
            raise RuntimeError(f"TensorRT {ctx.graph}: the backend was closed")
        if not ctx.memory_bound or ctx.memory_bound != be._scratch:  # a call run on its own (a canary) binds too
            be._bind_scratch()
        if not ctx.context.execute_async_v3(be._stream_handle):
            raise RuntimeError(f"TensorRT {ctx.graph}: IExecutionContext.execute_async_v3 failed (see the TensorRT "
                               "log above)")

    def __repr__(self) -> str:
        return f"<TensorRT call {self.ctx.graph}>"


class _Copy:
    """A device-to-device `cudaMemcpyAsync` on the stream."""

    __slots__ = ("backend", "dst", "nbytes", "src")

    def __init__(self, backend: TrtBackend, dst: int, src: int, nbytes: int) -> None:
        self.backend, self.dst, self.src, self.nbytes = backend, dst, src, nbytes

    def __call__(self) -> None:
        be = self.backend
        be._require_open()
        rt = be.cudart
        be._check("cudaMemcpyAsync", rt.cudaMemcpyAsync(self.dst, self.src, self.nbytes,
                                                        rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, be._stream))

    def __repr__(self) -> str:
        return f"<device copy {self.nbytes} B>"


class TrtBackend(StepGraphBackend):
    """The bundle's TensorRT engines (`engines/tensorrt/<precision>/<graph>.plan`) on one CUDA stream."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "fp16", trt: ModuleType | None = None,
                 cudart: ModuleType | None = None, device: int = 0) -> None:
        self._closed = True
        self.trt = trt if trt is not None else import_tensorrt()
        self.cudart = cudart if cudart is not None else import_cudart()
        self.bundle, self.precision, self.device = bundle, precision, device
        self.gpu = gpu_info(device, cudart=self.cudart)
        check_engine_compat(bundle.manifest, self.trt.__version__, self.gpu["name"], self.gpu["compute_capability"],
                            precision=precision, bundle=bundle.root)
        rt = self.cudart
        self._check("cudaSetDevice", rt.cudaSetDevice(device))
        self._stream = self._check("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self._stream_handle = int(self._stream)
        self._closed = False
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        self._contexts: list[_Context] = []
        self._calls: dict[tuple, _Enqueue] = {}
        self._allocs = Buffers()  # from empty()
        self._scratch = 0  # the activation buffer shared by every context
        self._scratch_size = 0
        self._graphs: dict[object, _Captured] = {}
        self._host_pending: list[np.ndarray] = []  # upload sources, kept until the stream is synchronized

    # -- errors, lifetime -------------------------------------------------------------------------------------------
    def _check(self, fn: str, result: tuple) -> Any:
        """cuda-python returns (cudaError_t, *outputs): raise on an error, return the output(s)."""
        return cuda_check(self.cudart, fn, result)

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("the TensorRT backend is closed")

    def close(self) -> None:
        """Wait for the stream, then free graphs, contexts, engines, device memory and the stream."""
        if self._closed:
            return
        rt = self.cudart
        errors: list[str] = []

        def attempt(fn: str, result: tuple) -> None:
            if result[0] != rt.cudaError_t.cudaSuccess:
                errors.append(f"{fn} failed: {getattr(result[0], 'name', result[0])}")

        attempt("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
        for cap in self._graphs.values():
            attempt("cudaGraphExecDestroy", rt.cudaGraphExecDestroy(cap.graph_exec))
        self._graphs.clear()
        self._calls.clear()
        for c in self._contexts:  # ops still held by a scheduler keep no context: contexts go before their engines
            c.context = None
        self._contexts.clear()
        self._engines.clear()  # TensorRT objects are released with their last reference
        for ptr in [*self._allocs, *([self._scratch] if self._scratch else [])]:
            attempt("cudaFree", rt.cudaFree(ptr))
        self._allocs.clear()
        self._scratch = self._scratch_size = 0
        attempt("cudaStreamDestroy", rt.cudaStreamDestroy(self._stream))
        self._host_pending.clear()
        self._closed = True
        if errors:
            raise CudaError("; ".join(errors))

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- memory -----------------------------------------------------------------------------------------------------
    def _malloc(self, nbytes: int) -> int:
        return int(self._check("cudaMalloc", self.cudart.cudaMalloc(max(int(nbytes), 1))))

    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> DeviceArray:
        self._require_open()
        shape, dt = tuple(int(s) for s in shape), np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        ptr = self._malloc(nbytes)
        self._allocs.add(ptr, nbytes)
        return DeviceArray(ptr, shape, dt, None)

    def _owned(self, a: DeviceArray) -> bool:
        return a in self._allocs

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        """Host -> device on the stream (asynchronous; the host copy is kept until the stream is synchronized)."""
        self._require_open()
        if not self._owned(dst):
            raise ValueError(f"upload: the destination {dst!r} is not memory of this TensorRT backend")
        host = np.asarray(src)
        if int(np.prod(host.shape)) != int(np.prod(dst.shape)):
            raise ValueError(f"upload: {host.shape} into a buffer of shape {dst.shape}")
        host = np.ascontiguousarray(host.reshape(dst.shape).astype(dst.dtype, casting="same_kind", copy=False))
        rt = self.cudart
        self._check("cudaMemcpyAsync", rt.cudaMemcpyAsync(dst.ptr, host.ctypes.data, dst.nbytes,
                                                          rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
        self._host_pending.append(host)

    def download(self, src: DeviceArray) -> np.ndarray:
        """Device -> host after the work enqueued before it: the one place (with synchronize) that waits."""
        self._require_open()
        if not self._owned(src):
            raise ValueError(f"download: the source {src!r} is not memory of this TensorRT backend")
        out = np.empty(src.shape, src.dtype)
        rt = self.cudart
        self._check("cudaMemcpyAsync", rt.cudaMemcpyAsync(out.ctypes.data, src.ptr, src.nbytes,
                                                          rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self._require_open()
        self._check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(self._stream))
        self._host_pending.clear()

    # -- engines ----------------------------------------------------------------------------------------------------
    def _engine(self, graph: str) -> _Engine:
        if graph in self._engines:
            return self._engines[graph]
        root, t = self.bundle.root, self.trt
        entry = self.bundle.manifest.engines.get(engine_entry_key(self.precision, graph))
        if entry is None:
            raise EngineCompatError(f"{root}: no TensorRT {self.precision} engine for the {graph} graph; build it "
                                    f"with `{rebuild_command(self.precision, root)}`")
        path = bundle_path(root, entry.files[0])
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineCompatError(f"{path}: TensorRT {t.__version__} could not deserialize this engine (the "
                                    f"TensorRT log above says why); rebuild it with "
                                    f"`{rebuild_command(self.precision, root)}`")
        tensors = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == t.TensorIOMode.INPUT
            trt_dtype = engine.get_tensor_dtype(name).name
            np_type = _NP_TYPES.get(trt_dtype)
            profile = None
            if is_input:
                mn, _, mx = engine.get_tensor_profile_shape(name, 0)
                profile = (tuple(mn), tuple(mx))
            tensors[name] = _Tensor(name, is_input, None if np_type is None else np.dtype(np_type), trt_dtype,
                                    tuple(engine.get_tensor_shape(name)), profile)
        self._engines[graph] = _Engine(graph, path, engine, tensors)
        return self._engines[graph]

    def precision_of(self, graph: str) -> str:
        """fp32 engines run their matrix products in TF32 (TensorRT's default on GPUs that have it)."""
        return "tf32" if self.precision == "fp32" else self.precision

    def discard(self, graph: str) -> str:
        """The engine is deserialized again from its file at the next call (contexts made from it stay with their
        calls)."""
        return "deserializing its engine again" if self._engines.pop(graph, None) is not None else ""

    def canary_size(self, bundle: Bundle, graph: str) -> tuple[int, int]:
        """A static-size engine (`build-engines --static-size`) takes only the bundle's example size, where its build
        recorded a canary."""
        entry = bundle.manifest.engines.get(engine_entry_key(self.precision, graph))
        if entry is not None and entry.info.get("config", {}).get("sizes") == "opt":
            return bundle.width, bundle.height
        return super().canary_size(bundle, graph)

    def _check_binding(self, eng: _Engine, t: _Tensor, a: DeviceArray) -> None:
        where = f"TensorRT {eng.graph}: {'input' if t.is_input else 'output'} {t.name}"
        if not isinstance(a, DeviceArray) or not self._owned(a):
            raise ValueError(f"{where} is bound to {a!r}, which is not memory of this TensorRT backend (make buffers "
                             "with its empty())")
        if t.dtype is None:
            raise ValueError(f"{where} is {t.trt_dtype}, which has no numpy type; export the graph with "
                             "float32/float16 I/O")
        if a.dtype != t.dtype:
            raise ValueError(f"{where} is {t.dtype} in the engine but its buffer is {a.dtype}")
        if len(a.shape) != len(t.shape) or any(d >= 0 and d != s for d, s in zip(t.shape, a.shape, strict=True)):
            raise ValueError(f"{where} has shape {list(t.shape)} in the engine (-1: any) but its buffer is "
                             f"{list(a.shape)}")
        if t.profile is not None:
            mn, mx = t.profile
            if any(not lo <= s <= hi for lo, s, hi in zip(mn, a.shape, mx, strict=True)):
                raise ValueError(f"{where}: {list(a.shape)} is outside the engine's optimization profile "
                                 f"{list(mn)} .. {list(mx)}; rebuild the engines for this batch size with "
                                 f"`{rebuild_command(self.precision, self.bundle.root)}` (re-export with a larger "
                                 "--batch-max first if needed)")

    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        """An op that enqueues `graph` on the stream with every I/O tensor bound to the given buffers.

        The shapes, addresses and dtypes are checked against the engine here, once; the context made for the call
        keeps them (docs/design.md, "The GPU path")."""
        self._require_open()
        eng = self._engine(graph)
        names = list(eng.tensors)
        missing = [n for n in names if n not in bindings]
        if missing:
            raise KeyError(f"TensorRT {graph}: no buffer bound for {missing}")
        extra = sorted(set(bindings) - set(names))
        if extra:
            raise KeyError(f"TensorRT {graph}: the engine has no tensors {extra} (it has {names})")
        for n in names:
            self._check_binding(eng, eng.tensors[n], bindings[n])
        key = (graph, tuple((n, bindings[n].ptr, bindings[n].shape) for n in names))
        if key in self._calls:  # the same call prepared twice: one context serves both
            return self._calls[key]
        t = self.trt
        context = eng.engine.create_execution_context(t.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"TensorRT {graph}: could not create an execution context")
        for n, tensor in eng.tensors.items():
            if tensor.is_input and not context.set_input_shape(n, bindings[n].shape):
                raise ValueError(f"TensorRT {graph}: set_input_shape({n}, {list(bindings[n].shape)}) was refused")
        for n, tensor in eng.tensors.items():
            if not tensor.is_input:
                got = tuple(context.get_tensor_shape(n))
                if got != bindings[n].shape:
                    raise ValueError(f"TensorRT {graph}: output {n} is {list(got)} for these input shapes but its "
                                     f"buffer is {list(bindings[n].shape)}")
        for n in names:
            if not context.set_tensor_address(n, bindings[n].ptr):
                raise ValueError(f"TensorRT {graph}: set_tensor_address({n}) was refused")
        ctx = _Context(graph, context, int(context.update_device_memory_size_for_shapes()), 0, dict(bindings))
        self._contexts.append(ctx)
        op = _Enqueue(self, ctx)
        self._calls[key] = op
        return op

    def _bind_scratch(self) -> None:
        """Give every context the shared activation buffer, (re)allocating it if a context needs more. Runs before a
        program's first run, never inside a capture."""
        need = max((c.memory_size for c in self._contexts), default=0)
        if need > self._scratch_size or not self._scratch:
            if self._scratch:
                self.synchronize()  # work enqueued with the old buffer completes before it goes
                self._drop_graphs()  # captured graphs recorded the old address
                self._check("cudaFree", self.cudart.cudaFree(self._scratch))
                self._scratch = self._scratch_size = 0
            self._scratch = self._malloc(need)
            self._scratch_size = max(need, 1)
        for c in self._contexts:
            if c.memory_bound != self._scratch:
                c.context.set_device_memory(self._scratch, self._scratch_size)
                c.memory_bound = self._scratch

    # -- scheduler updates (ddim / guided: the step engines, StepGraphBackend) --------------------------------------
    def copy(self, dst: DeviceArray, src: DeviceArray) -> Op:
        self._require_open()
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"copy: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
        if not (self._owned(dst) and self._owned(src)):
            raise ValueError("copy: both buffers must be memory of this TensorRT backend")
        return _Copy(self, dst.ptr, src.ptr, dst.nbytes)

    # -- programs ---------------------------------------------------------------------------------------------------
    def _drop_graphs(self) -> None:
        for cap in self._graphs.values():
            self._check("cudaGraphExecDestroy", self.cudart.cudaGraphExecDestroy(cap.graph_exec))
        self._graphs.clear()

    def _capture(self, program: Sequence[Op]) -> Any:
        rt = self.cudart
        self._check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(
            self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            for op in program:
                op()
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self._stream)  # leave capture mode; the partial graph is dropped
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = self._check("cudaStreamEndCapture", rt.cudaStreamEndCapture(self._stream))
        try:
            return self._check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._check("cudaGraphDestroy", rt.cudaGraphDestroy(graph))  # the executable graph is independent

    def execute(self, program: Sequence[Op], key: object) -> None:
        """First call for `key`: run the program (uncaptured), then capture and instantiate it. Then: one launch."""
        self._require_open()
        cap = self._graphs.get(key)
        if cap is not None and (cap.program is not program or cap.length != len(program)):
            self._check("cudaGraphExecDestroy", self.cudart.cudaGraphExecDestroy(cap.graph_exec))
            del self._graphs[key]
            cap = None
        if cap is None:
            self._bind_scratch()
            for op in program:  # the enqueue after each context's shape change, outside the capture; this batch
                op()
            self._graphs[key] = _Captured(program, len(program), self._capture(program))
            return
        self._check("cudaGraphLaunch", self.cudart.cudaGraphLaunch(cap.graph_exec, self._stream))

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "precision": self.precision, "tensorrt": str(self.trt.__version__),
                "gpu": self.gpu["name"], "compute_capability": self.gpu["compute_capability"],
                "cuda_graphs": "per program", "contexts": str(len(self._contexts))}


def open_backend(bundle: Bundle, device: str, precision: str, threads: int = 0,
                 model: Path | None = None) -> Backend:
    """The backend table's runtime entry (one GPU; `threads` does not apply)."""
    return TrtBackend(bundle, precision=precision)


__all__ = ["CudaError", "TrtBackend", "open_backend"]
