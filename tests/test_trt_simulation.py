"""The TensorRT backend (runtime/backend_trt.py) on the CPU simulation of the GPU path (tests/support/gpu_sim.py).

The simulation stands behind the same TensorRT and cuda-python calls, generated from the real APIs' listings (a call
or argument they lack fails), and runs the bundle's ONNX graphs on ONNX Runtime CPU at the device addresses bound.
So the backend is compared with OrtBackend number for number, and its discipline is checked on the recorded calls:
one capture, replays, no allocation or host synchronization inside the program, Q/K shared between emit and inject.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import gpu_sim
from support.api import load_api
from support.bundles import copy_bundle, set_batch_dims

from r2r import gpu, graph_io
from r2r.config import Method, Variant
from r2r.engines import tensorrt as trtb
from r2r.manifest import read_manifest
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.backend_trt import CudaError, TrtBackend
from r2r.runtime.bundle_reader import Bundle, open_bundle
from r2r.runtime.device import DeviceArray
from r2r.runtime.scheduler import CoupledScheduler
from r2r.tiny import LATENT_CHANNELS as C

H = W = 256


@pytest.fixture(scope="module")
def sim_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with simulated fp32 TensorRT engines for every graph."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("trt-sim") / "bundle")
    for graph in read_manifest(root).graphs:
        set_batch_dims(root, graph, None)
    entries = gpu_sim.build_sim_engines(root, "fp32")
    assert {e.graph for e in entries} == set(read_manifest(root).graphs)
    return root


@pytest.fixture(scope="module")
def bundle(sim_bundle: Path) -> Bundle:
    return open_bundle(sim_bundle)


def _names(mod: Any, start: int = 0, stop: int | None = None) -> list[str]:
    """The calls recorded in a stand-in module, without the handles' own dunder calls."""
    names = [c.name for c in mod._fake_calls[start:stop]]
    return [n for n in names if "." not in n or not n.split(".")[1].startswith("_")]


@dataclass
class SimRun:
    fused: bool
    images: list[np.ndarray]
    ort: list[np.ndarray]
    trt_out: list[np.ndarray]
    trt: Any
    cudart: Any
    backend: TrtBackend
    sched: CoupledScheduler
    marks: list[tuple[int, int, int]]  # (cudart calls, tensorrt calls, device executions) before each batch and after

    def cuda_calls(self, batch: int) -> list[str]:
        return _names(self.cudart, self.marks[batch][0], self.marks[batch + 1][0])

    def trt_calls(self, batch: int) -> list[str]:
        return _names(self.trt, self.marks[batch][1], self.marks[batch + 1][1])

    def executions(self, batch: int) -> list[tuple[str, dict[str, int]]]:
        return self.cudart._sim.executions[self.marks[batch][2]:self.marks[batch + 1][2]]


@pytest.fixture(scope="module", params=[False, True], ids=["emit-inject", "fused"])
def run(request: pytest.FixtureRequest, sim_bundle: Path, bundle: Bundle, stripes_image) -> SimRun:
    """Two batches of one image through OrtBackend and through TrtBackend on the simulation, at the defaults."""
    fused = request.param
    images = [stripes_image(11), stripes_image(12)]
    ort_sched = CoupledScheduler(bundle, OrtBackend(bundle), 1, Method(), Variant(fused=fused))
    ort = [ort_sched([im])[0] for im in images]
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    backend = TrtBackend(bundle, "fp32", trt=trt, cudart=cudart)
    sched = CoupledScheduler(bundle, backend, 1, Method(), Variant(fused=fused))
    marks = [(len(cudart._fake_calls), len(trt._fake_calls), len(cudart._sim.executions))]
    outs = []
    for im in images:
        outs.append(sched([im])[0])
        marks.append((len(cudart._fake_calls), len(trt._fake_calls), len(cudart._sim.executions)))
    yield SimRun(fused, images, ort, outs, trt, cudart, backend, sched, marks)
    backend.close()
    assert cudart._sim.live_allocations == 0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# ---- numbers ------------------------------------------------------------------------------------------------------

def test_tensorrt_path_equals_onnxruntime_bit_for_bit(run: SimRun) -> None:
    """Bit-exact, not a PSNR bound: the simulation runs the same ONNX graphs with the same ORT session options at the
    same inputs, and the step graphs do OrtBackend's numpy updates in the same float32 order (ddim: cz*z + ce*eps;
    guided: e_neg + w*(e_null - e_neg), then cz*z + ce*e). Any difference is a binding or ordering bug."""
    assert len(run.trt_out) == 2  # the first batch ran uncaptured (warm-up), the second is the graph's replay
    for batch, (got, want) in enumerate(zip(run.trt_out, run.ort, strict=True)):
        assert got.shape == (H, W, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), f"batch {batch}: PSNR {_psnr(got, want):.1f} dB against OrtBackend"
    assert not np.array_equal(run.trt_out[0], run.trt_out[1])  # the replay read the new upload
    assert not run.cudart._sim.faults


# ---- the discipline -----------------------------------------------------------------------------------------------

def test_the_second_batch_replays_the_captured_graph(run: SimRun) -> None:
    first, second = run.cuda_calls(0), run.cuda_calls(1)
    assert first.count("cudaStreamBeginCapture") == 1 and first.count("cudaGraphInstantiate") == 1
    assert first.count("cudaGraphLaunch") == 0  # the uncaptured warm-up computed the first batch
    assert second.count("cudaStreamBeginCapture") == 0 and second.count("cudaGraphInstantiate") == 0
    assert second.count("cudaGraphLaunch") == 1
    # the replay does not touch TensorRT at all: no new contexts, shapes, addresses or enqueues
    assert run.trt_calls(1) == []
    # ... and yet every engine ran, from the graph: as many engine runs as in the warm-up
    ops = [op for op in run.sched.plan.ops if repr(op).startswith("<TensorRT call")]
    assert len(run.executions(1)) == len(run.executions(0)) == len(ops)
    n = len(run.sched.plan.ops)
    assert run.trt_calls(0).count("IExecutionContext.execute_async_v3") == len(ops) * 2  # warm-up + capture
    assert n > 60


def test_nothing_is_allocated_after_setup(run: SimRun) -> None:
    setup = _names(run.cudart, 0, run.marks[0][0])
    first, second = run.cuda_calls(0), run.cuda_calls(1)
    assert setup.count("cudaMalloc") > 20  # every buffer, once
    assert second.count("cudaMalloc") == 0 and second.count("cudaFree") == 0
    # the first batch allocates only the shared activation buffer, before anything runs
    assert first.count("cudaMalloc") == 1 and first[:first.index("cudaMalloc")] == ["cudaMemcpyAsync"]
    assert "IExecutionContext.set_tensor_address" not in run.trt_calls(0)  # addresses were set when bound
    assert "ICudaEngine.create_execution_context" not in run.trt_calls(0)


def test_no_host_synchronization_inside_the_program(run: SimRun) -> None:
    # a batch: upload, the program (here one launch), then after it the downloads of the images and of the final
    # latents (checked for NaN / Inf), each a copy to host then a synchronize
    assert run.cuda_calls(1) == ["cudaMemcpyAsync", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaStreamSynchronize",
                                 "cudaMemcpyAsync", "cudaStreamSynchronize"]
    first = run.cuda_calls(0)
    assert first.count("cudaStreamSynchronize") == 2 and first[-3:] == run.cuda_calls(1)[-3:]
    copies = [c for c in run.cudart._fake_calls[run.marks[0][0]:run.marks[1][0]] if c.name == "cudaMemcpyAsync"]
    kinds = [c.args["kind"].name for c in copies]
    assert kinds[0] == "cudaMemcpyHostToDevice" and kinds[-2:] == ["cudaMemcpyDeviceToHost"] * 2
    assert set(kinds[1:-2]) == {"cudaMemcpyDeviceToDevice"}  # the [zr, zr] batch, warm-up and capture


def test_emit_qk_outputs_are_the_inject_qk_inputs(run: SimRun) -> None:
    if run.fused:  # the fused engine moves Q/K inside itself: no emit or inject call may run
        assert not [g for g, _ in run.executions(1) if g in (graph_io.UNET_EMIT, graph_io.UNET_INJECT)]
        return
    names = graph_io.tac_names(len(run.sched.bundle.tac_layers))
    emit = [addrs for graph, addrs in run.executions(1) if graph == graph_io.UNET_EMIT]
    inject = [addrs for graph, addrs in run.executions(1) if graph == graph_io.UNET_INJECT]
    assert len(emit) == len(inject) == run.sched.window
    for e, i in zip(emit, inject, strict=True):  # what actually ran, replayed from the graph
        assert [e[n] for n in names] == [i[n] for n in names]
    assert len({tuple(e[n] for n in names) for e in emit}) == 1  # one set of Q/K buffers (exact inversion)


def test_scheduler_updates_run_as_step_engines_on_the_device(run: SimRun) -> None:
    graphs = [g for g, _ in run.executions(1)]
    n = run.sched.schedule.n
    assert graphs.count(graph_io.DDIM_STEP) == n and graphs.count(graph_io.GUIDED_STEP) == n
    coefs = run.sched.coefs  # the coefficient table lives on the device; each update reads its row
    rows = [a[graph_io.COEF] for g, a in run.executions(1) if g in (graph_io.DDIM_STEP, graph_io.GUIDED_STEP)]
    assert all(coefs.ptr <= r < coefs.ptr + coefs.nbytes for r in rows) and len(set(rows)) == 2 * n


# ---- the simulation holds the backend to the real APIs -----------------------------------------------------------

def test_calls_the_real_apis_lack_are_refused(sim_bundle: Path, bundle: Bundle) -> None:
    methods = load_api("tensorrt")["classes"]["IExecutionContext"]["methods"]
    assert "execute_v2" in methods and "execute_async_v3" in methods
    assert not {"enqueue", "execute", "execute_async", "execute_async_v2", "enqueue_v2"} & set(methods)
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as be:
        z, eps, coef = be.empty((1, C, 32, 32)), be.empty((1, C, 32, 32)), be.empty((3,))
        be.ddim(be.empty((1, C, 32, 32)), z, eps, None, coef)  # type: ignore[arg-type]
        ctx = trt._sim_contexts[-1]
        with pytest.raises(AttributeError):
            ctx.execute_async_v2([0, 0, 0, 0], be._stream_handle)  # removed in TensorRT 10
        with pytest.raises(AttributeError):
            ctx.enqueue(1, [0, 0, 0, 0], be._stream_handle, None)
        with pytest.raises(TypeError, match="incompatible function arguments"):
            ctx.execute_async_v3()  # the stream handle is required
        with pytest.raises(NotImplementedError, match="real TensorRT API but is not emulated"):
            ctx.execute_v2([0, 0, 0, 0])
        with pytest.raises(AttributeError):
            trt.Runtime(trt.Logger()).deserialize_engine(b"")
        with pytest.raises(TypeError, match="incompatible function arguments"):
            cudart.cudaGraphInstantiate(0)  # cuda-python 12+/13: (graph, flags)
        with pytest.raises(TypeError, match="incompatible function arguments"):
            cudart.cudaGraphInstantiate(0, bufferSize=0)  # the cuda-python 11 argument
        with pytest.raises(TypeError, match="incompatible function arguments"):
            cudart.cudaMemcpyAsync(0, 0, 4, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)  # stream missing
        assert not hasattr(cudart, "cudaStreamCaptureBegin")
        with pytest.raises(NotImplementedError, match="not emulated"):
            cudart.cudaEventCreate()  # real, but nothing here needs it


def test_the_first_enqueue_after_a_shape_change_is_not_captured(sim_bundle: Path, bundle: Bundle) -> None:
    """The TensorRT guide's rule, enforced by the simulation: TrtBackend.execute runs a program once before capture."""
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as be:
        z, eps, coef, out = (be.empty(s) for s in ((1, C, 32, 32), (1, C, 32, 32), (3,), (1, C, 32, 32)))
        op = be.ddim(out, z, eps, None, coef)  # type: ignore[arg-type]
        be._bind_scratch()
        rt = cudart
        be._check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(
            be._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
            op()
        assert rt.cudaStreamEndCapture(be._stream)[0] == rt.cudaError_t.cudaErrorStreamCaptureInvalidated
        assert any("after an input shape change" in line for line in trt._fake_log)
        program = [op]
        be.execute(program, key="k")  # warm-up, then the capture: fine
        be.execute(program, key="k")
        assert len(gpu_sim.calls(cudart, "cudaGraphLaunch")) == 1
        be.execute([op], key="k")  # another program under a reused key is captured afresh, never replayed stale
        assert len(gpu_sim.calls(cudart, "cudaStreamBeginCapture")) == 3
        assert len(gpu_sim.calls(cudart, "cudaGraphExecDestroy")) == 1


def test_engines_for_another_gpu_or_tensorrt_are_refused(sim_bundle: Path, bundle: Bundle) -> None:
    l4 = {"name": "NVIDIA L4", "compute_capability": "8.9", "total_memory_bytes": 23_000_000_000}
    trt, cudart = gpu_sim.sim_modules(sim_bundle, gpu=l4)
    rebuild = f"r2r-export build-engines --backend tensorrt --precision fp32 --out {sim_bundle}"
    with pytest.raises(trtb.EngineCompatError, match="NVIDIA L4") as exc:
        TrtBackend(bundle, "fp32", trt=trt, cudart=cudart)
    assert rebuild in str(exc.value)
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    trt.__version__ = "10.8.0.43"
    with pytest.raises(trtb.EngineCompatError, match=r"built with TensorRT 10\.16.*this machine has TensorRT 10\.8"
                       ) as exc:
        TrtBackend(bundle, "fp32", trt=trt, cudart=cudart)
    assert rebuild in str(exc.value)
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with pytest.raises(trtb.EngineCompatError, match="no TensorRT fp16 engines") as exc:
        TrtBackend(bundle, "fp16", trt=trt, cudart=cudart)
    assert "r2r-export build-engines --backend tensorrt --precision fp16" in str(exc.value)
    assert not gpu_sim.calls(cudart, "cudaMalloc")  # refused before anything was allocated


def test_without_tensorrt_the_backend_names_the_install(monkeypatch: pytest.MonkeyPatch, bundle: Bundle) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without the gpu extra
    with pytest.raises(gpu.TensorRTNotInstalled) as exc:
        TrtBackend(bundle)
    assert str(exc.value) == gpu.INSTALL_HINT and "\n" not in str(exc.value)
    assert "pip install 'r2r[gpu]'" in str(exc.value)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(gpu.TensorRTNotInstalled, match=r"cuda-python is not installed: pip install 'r2r\[gpu\]'"):
        TrtBackend(bundle, "fp32", trt=gpu_sim.fake_tensorrt(bundle.root))


@pytest.mark.parametrize("variant", [Variant(), Variant(fused=True), Variant("single-pass")])
def test_every_call_of_the_largest_batch_fits_the_engines_profiles(sim_bundle: Path, bundle: Bundle,
                                                                   variant: Variant) -> None:
    """At batch = batch_max the routed UNet binds up to 3 * batch_max latents (the fused step): its profile covers
    it."""
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as be:
        sched = CoupledScheduler(bundle, be, bundle.manifest.batch_max, Method(steps=10, strength=0.5), variant)
        assert sched.plan.graph_calls[graph_io.UNET] > 0


def test_bindings_that_do_not_fit_the_engine_are_refused(sim_bundle: Path, bundle: Bundle) -> None:
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as be:
        lat = (C, 32, 32)
        ok = {graph_io.SAMPLE: be.empty((1, *lat)), graph_io.TIMESTEP: be.empty((1,)),
              graph_io.ENCODER_HIDDEN_STATES: be.empty((1, 77, 64)), graph_io.EPS: be.empty((1, *lat)),
              graph_io.TAC_SRC: be.empty((1,), np.int64)}
        be.call(graph_io.UNET, ok)
        with pytest.raises(KeyError, match=r"no buffer bound for \['eps'\]"):
            be.call(graph_io.UNET, {k: v for k, v in ok.items() if k != graph_io.EPS})
        with pytest.raises(KeyError, match="has no tensors"):
            be.call(graph_io.UNET, {**ok, "tac_q_0": be.empty((1, 1024, 32))})
        bad_shape = rf"unet: input sample has shape \[-1, {C}, -1, -1\].*buffer is \[1, {C + 1}, 32"
        with pytest.raises(ValueError, match=bad_shape):
            be.call(graph_io.UNET, {**ok, graph_io.SAMPLE: be.empty((1, C + 1, 32, 32))})
        with pytest.raises(ValueError, match=rf"output eps is \[1, {C}, 64, 32\] for these input shapes"):
            be.call(graph_io.UNET, {**ok, graph_io.SAMPLE: be.empty((1, C, 64, 32))})  # another size: its own buffers
        with pytest.raises(ValueError, match=r"outside the engine's optimization profile"):  # sides up to 2048 px
            be.call(graph_io.UNET, {**ok, graph_io.SAMPLE: be.empty((1, C, 264, 32)),
                                    graph_io.EPS: be.empty((1, C, 264, 32))})
        with pytest.raises(ValueError, match="float32 in the engine but its buffer is float16"):
            be.call(graph_io.UNET, {**ok, graph_io.EPS: be.empty((1, *lat), np.float16)})
        with pytest.raises(ValueError, match=rf"output eps is \[1, {C}, 32, 32\] for these input shapes.*\[2, {C}, 32"):
            be.call(graph_io.UNET, {**ok, graph_io.EPS: be.empty((2, *lat))})
        with pytest.raises(ValueError, match=r"outside the engine's optimization profile.*r2r-export build-engines"):
            be.call(graph_io.UNET, {**ok, graph_io.SAMPLE: be.empty((17, *lat)),
                                    graph_io.ENCODER_HIDDEN_STATES: be.empty((17, 77, 64)),
                                    graph_io.EPS: be.empty((17, *lat)),
                                    graph_io.TAC_SRC: be.empty((17,), np.int64)})  # profile 1..16
        host = np.zeros((1, *lat), np.float32)
        with pytest.raises(ValueError, match="not memory of this TensorRT backend"):
            be.call(graph_io.UNET, {**ok, graph_io.SAMPLE: DeviceArray(host.ctypes.data, host.shape, host.dtype, host)})
        with pytest.raises(trtb.EngineCompatError, match="no TensorRT fp32 engine for the nope graph"):
            be.call("nope", ok)


def test_cuda_errors_name_the_function(sim_bundle: Path, bundle: Bundle) -> None:
    trt, cudart = gpu_sim.sim_modules(sim_bundle, memory_limit=1 << 20)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as be:
        with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
            be.empty((1 << 20,))
        a = be.empty((4,))
        be.upload(a, np.arange(4, dtype=np.float32))
        assert np.array_equal(be.download(a), np.arange(4, dtype=np.float32))


def test_close_frees_everything(sim_bundle: Path, bundle: Bundle) -> None:
    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    sim = cudart._sim
    be = TrtBackend(bundle, "fp32", trt=trt, cudart=cudart)
    z, eps, out = (be.empty((1, C, 32, 32)) for _ in range(3))
    coef = be.empty((3,))
    be.upload(z, np.ones((1, C, 32, 32), np.float32))
    be.upload(eps, np.full((1, C, 32, 32), 2, np.float32))
    be.upload(coef, np.array([0.5, 0.25, 7.5], np.float32))
    program = [be.ddim(out, z, eps, None, coef), be.copy(z, out)]  # type: ignore[arg-type]
    for _ in range(3):
        be.execute(program, key="p")
    np.testing.assert_array_equal(be.download(z), _ddim_thrice())  # warm-up, then two replays
    assert sim.live_allocations == 5 and sim.execs  # four buffers and the activation buffer
    be.close()
    assert sim.live_allocations == 0 and not sim.execs and set(sim.streams) == {0}
    be.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        be.empty((1,))


def _ddim_thrice() -> np.ndarray:
    z = np.ones((1, C, 32, 32), np.float32)
    eps = np.full_like(z, 2)
    for _ in range(3):
        z = np.float32(0.5) * z + np.float32(0.25) * eps
    return z


# ---- the simulation itself ----------------------------------------------------------------------------------------

def test_the_simulated_device_is_asynchronous() -> None:
    """Work runs when the stream is synchronized (or copied to host): a missing synchronize reads stale memory."""
    rt = gpu_sim.fake_cudart()
    sim, ok = rt._sim, rt.cudaError_t.cudaSuccess
    err, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    assert err == ok
    err, a = rt.cudaMalloc(16)
    err, b = rt.cudaMalloc(16)
    assert np.isnan(sim.peek(a, (4,), np.float32)).all()  # cudaMalloc memory is not cleared
    host = np.arange(4, dtype=np.float32)
    assert rt.cudaMemcpyAsync(a, host.ctypes.data, 16, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)[0] == ok
    host[:] = -1  # pageable memory is staged at the call: changing it afterwards does not matter
    assert rt.cudaMemcpyAsync(b, a, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)[0] == ok
    assert np.isnan(sim.peek(b, (4,), np.float32)).all()  # enqueued, not run
    assert rt.cudaStreamSynchronize(stream)[0] == ok
    np.testing.assert_array_equal(sim.peek(b, (4,), np.float32), np.arange(4, dtype=np.float32))
    out = np.zeros(4, np.float32)
    assert rt.cudaMemcpyAsync(b, host.ctypes.data, 16, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)[0] == ok
    assert rt.cudaMemcpyAsync(out.ctypes.data, b, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)[0] == ok
    np.testing.assert_array_equal(out, -1)  # a copy to pageable host memory completes the stream's work first
    bad = rt.cudaMemcpyAsync(b, out.ctypes.data, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)
    assert bad[0] == rt.cudaError_t.cudaErrorInvalidValue  # a host pointer where a device one belongs


def test_capture_records_and_replays() -> None:
    rt = gpu_sim.fake_cudart()
    sim, ok, kind = rt._sim, rt.cudaError_t.cudaSuccess, rt.cudaMemcpyKind
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
    _, stream = rt.cudaStreamCreate()
    _, a = rt.cudaMalloc(8)
    _, b = rt.cudaMalloc(8)
    assert rt.cudaMemsetAsync(a, 1, 8, stream)[0] == ok
    assert rt.cudaStreamBeginCapture(0, mode)[0] == rt.cudaError_t.cudaErrorStreamCaptureUnsupported  # legacy stream
    assert rt.cudaStreamBeginCapture(stream, mode)[0] == ok
    assert rt.cudaStreamIsCapturing(stream)[1] == rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive
    assert rt.cudaMemcpyAsync(b, a, 8, kind.cudaMemcpyDeviceToDevice, stream)[0] == ok
    err, graph = rt.cudaStreamEndCapture(stream)
    assert err == ok
    assert (sim.peek(b, (8,), np.uint8) == 0xFF).all()  # recorded, not run
    err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
    assert err == ok and rt.cudaGraphDestroy(graph)[0] == ok
    assert rt.cudaGraphLaunch(graph_exec, stream)[0] == ok
    assert rt.cudaStreamSynchronize(stream)[0] == ok
    assert (sim.peek(b, (8,), np.uint8) == 1).all()
    # what CUDA refuses during a global-mode capture voids it
    for bad in (lambda: rt.cudaStreamSynchronize(stream), lambda: rt.cudaMalloc(8),
                lambda: rt.cudaMemcpyAsync(np.zeros(8, np.uint8).ctypes.data, a, 8, kind.cudaMemcpyDeviceToHost,
                                           stream)):
        assert rt.cudaStreamBeginCapture(stream, mode)[0] == ok
        assert bad()[0] == rt.cudaError_t.cudaErrorStreamCaptureUnsupported
        assert rt.cudaStreamEndCapture(stream)[0] == rt.cudaError_t.cudaErrorStreamCaptureInvalidated
    # a fault in enqueued work surfaces at the synchronize, and sticks
    assert rt.cudaFree(a)[0] == ok
    assert rt.cudaGraphLaunch(graph_exec, stream)[0] == ok
    assert rt.cudaStreamSynchronize(stream)[0] == rt.cudaError_t.cudaErrorIllegalAddress
    assert rt.cudaMalloc(8)[0] == rt.cudaError_t.cudaErrorIllegalAddress
    assert "not inside a live device allocation" in sim.faults[0]


def test_the_builder_refuses_a_graph_with_a_fixed_batch(tiny_bundle: Path, tmp_path: Path) -> None:
    """TensorRT cannot build a profile over batch 1..4 for a graph whose batch is fixed; neither does the fake."""
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    set_batch_dims(root, graph_io.GUIDED_STEP, 2)
    with pytest.raises(trtb.TensorRTBuildError, match="could not build"):
        gpu_sim.build_sim_engines(root, "fp32", graphs=[graph_io.GUIDED_STEP])


def test_simulated_plans_map_back_to_their_graph(sim_bundle: Path) -> None:
    m = read_manifest(sim_bundle)
    entry = m.engines["tensorrt/fp32/unet"]
    trt = gpu_sim.fake_tensorrt(sim_bundle)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((sim_bundle / entry.files[0]).read_bytes())
    assert engine is not None and engine.name == graph_io.UNET
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == [graph_io.SAMPLE, graph_io.TIMESTEP, graph_io.ENCODER_HIDDEN_STATES, graph_io.TAC_SRC, graph_io.EPS]
    assert list(engine.get_tensor_shape(graph_io.SAMPLE)) == [-1, C, -1, -1]  # batch and sides free
    assert engine.get_tensor_mode(graph_io.EPS) == trt.TensorIOMode.OUTPUT
    # batch 1..4x4, sides 64..2048 px (latent 8..256), tuned for batch 4 at the example size 256x256
    assert [list(d) for d in engine.get_tensor_profile_shape(graph_io.SAMPLE, 0)] == [[1, C, 8, 8], [4, C, 32, 32],
                                                                                 [16, C, 256, 256]]
    trt.__version__ = "10.8.0.43"  # a plan from another TensorRT version does not deserialize
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine((sim_bundle / entry.files[0]).read_bytes()) is None
    assert "not compatible with this version of TensorRT" in trt._fake_log[-1]


def test_handle_classes_are_those_of_cuda_python() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime")
    fake = gpu_sim.fake_cudart()
    for cls in gpu_sim._HANDLE_CLASSES:
        real = getattr(runtime, cls)
        for member in ("getPtr", "__int__", "__index__", "__eq__", "__hash__"):
            assert hasattr(real, member) and hasattr(getattr(fake, cls), member), (cls, member)
        assert int(real(7)) == int(getattr(fake, cls)(7)) == 7
    assert isinstance(runtime.cudaStreamNonBlocking, int) and fake.cudaStreamNonBlocking == 1
    real_prop = runtime.cudaDeviceProp()
    for attr in ("name", "major", "minor", "totalGlobalMem"):
        assert hasattr(real_prop, attr)


def test_tensorrt_engines_pass_their_canaries_and_one_that_holds_other_weights_is_refused(
        sim_bundle: Path, bundle: Bundle, tmp_path: Path) -> None:
    """The canaries run through the engines themselves (tf32 bound at fp32: TensorRT's default on the GPU); an engine
    whose graph was rewritten under it is opened twice, then refused by name."""
    from support.engines import negate_conv_kernels

    from r2r.runtime.scheduler import program_graphs
    from r2r.runtime.verify import EngineRejected, verify_graphs

    trt, cudart = gpu_sim.sim_modules(sim_bundle)
    with TrtBackend(bundle, "fp32", trt=trt, cudart=cudart) as backend:
        verified = verify_graphs(backend, bundle, program_graphs(Variant(fused=True), step_graphs=True))
        assert {r.graph for r in verified.results} == {graph_io.DDIM_STEP, graph_io.GUIDED_STEP, graph_io.VAE_ENCODER,
                                                       graph_io.UNET, graph_io.VAE_DECODER}
        assert all(r.ok and r.precision == "tf32" for r in verified.results)
    root = copy_bundle(sim_bundle, tmp_path / "bundle")
    negate_conv_kernels(root, graph_io.VAE_DECODER)
    changed = open_bundle(root)
    trt, cudart = gpu_sim.sim_modules(root)
    said: list[str] = []
    with TrtBackend(changed, "fp32", trt=trt, cudart=cudart) as backend, \
            pytest.raises(EngineRejected, match="tensorrt fp32: the vae_decoder graph missed its canary twice"):
        verify_graphs(backend, changed, [graph_io.VAE_DECODER], progress=said.append)
    assert "deserializing its engine again" in said[0], said


def test_static_size_engines_are_checked_by_a_canary_of_the_example_size(tiny_bundle: Path, tmp_path: Path) -> None:
    from r2r.runtime.verify import verify_graphs

    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    for graph in read_manifest(root).graphs:
        set_batch_dims(root, graph, None)
    trtb.build_bundle_engines(root, trtb.TrtBuildConfig("fp32", sizes="opt"), graphs=[graph_io.VAE_DECODER],
                              trt=gpu_sim.fake_tensorrt(root), gpu=gpu_sim.fake_gpu_info, progress=lambda _: None)
    assert trtb.record_example_canaries(root, progress=lambda _: None) == [f"{g}@{W}x{H}" for g in
                                                                          read_manifest(root).graphs]
    b = open_bundle(root)
    trt, cudart = gpu_sim.sim_modules(root)
    with TrtBackend(b, "fp32", trt=trt, cudart=cudart) as backend:
        assert backend.canary_size(b, graph_io.VAE_DECODER) == (W, H)  # its profile takes no other size
        assert verify_graphs(backend, b, [graph_io.VAE_DECODER]).results[0].ok
