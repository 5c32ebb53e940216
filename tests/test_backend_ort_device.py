"""The device-resident ONNX Runtime backend: run on the CPU provider here (what CI has), compared number for number
with the host-memory OrtBackend; its CUDA options checked as data, without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.metrics import psnr
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.backend_ort_device import COPY_GRAPH, OrtDeviceBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.ort_session import ProviderUnavailable, cuda_provider_options, cuda_run_config, free_dims
from r2r.runtime.scheduler import CoupledScheduler
from r2r.tiny import LATENT_CHANNELS as C

W = H = 256



@pytest.fixture(scope="module")
def bundle(embedded_bundle: Path):
    return open_bundle(embedded_bundle)


@pytest.fixture(scope="module")
def renders() -> list[np.ndarray]:
    from r2r.training.data import render_pair, sample_design

    return [render_pair(sample_design(np.random.default_rng([7, i]), (W, H)), (W, H))[0] for i in range(2)]


def _cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def _with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


# ---- CUDA options, as data ----------------------------------------------------------------------------------------

def test_cuda_sessions_share_one_stream_and_enable_cuda_graphs() -> None:
    opts = cuda_provider_options(1, 0x7F00DEAD, cuda_graph=True)
    assert opts == {"device_id": "1", "has_user_compute_stream": "1", "user_compute_stream": str(0x7F00DEAD),
                    "enable_cuda_graph": "1"}
    assert all(isinstance(v, str) for v in opts.values())  # what the provider parses
    assert cuda_provider_options(0, 5, cuda_graph=False)["enable_cuda_graph"] == "0"
    with pytest.raises(ValueError, match="one stream"):
        cuda_provider_options(0, 0)


def test_each_cuda_call_replays_its_own_graph_without_a_host_sync() -> None:
    assert cuda_run_config(3) == {"gpu_graph_id": "3", "disable_synchronize_execution_providers": "1"}
    assert cuda_run_config(None) == {"gpu_graph_id": "-1", "disable_synchronize_execution_providers": "1"}
    with pytest.raises(ValueError, match="0 is ONNX Runtime's default graph"):
        cuda_run_config(0)


def test_cuda_sessions_share_the_stream_and_capture_where_onnxruntime_accepts(bundle, monkeypatch) -> None:
    """On the simulated CUDA runtime, with sessions stubbed (no CUDA provider here): a graph ONNX Runtime captures
    with its dynamic batch gets one session; one refused that way gets a session per batch with the batch fixed; one
    refused both ways runs uncaptured. The stream is made once, named in every session's options, destroyed last."""
    from support import gpu_sim

    import r2r.runtime.backend_ort_device as mod

    _with_cuda(monkeypatch)
    rt = gpu_sim.fake_cudart()
    opened: list[tuple[str, dict, dict | None]] = []

    def fake_open(_ort, model, _threads, providers, preoptimized=False, free_dims=None):
        name = "copy" if isinstance(model, bytes) else Path(model).stem
        ((provider, opts),) = providers
        assert provider == "CUDAExecutionProvider"
        opened.append((name, opts, free_dims))
        capture = opts["enable_cuda_graph"] == "1"
        if capture and (name == "vae_decoder" or (name == "guided_step" and not free_dims)):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature "
                               "as requested by the user as all compute graph nodes have not been partitioned to "
                               "the CUDAExecutionProvider")
        return f"{name} {free_dims}"

    monkeypatch.setattr(mod, "open_session", fake_open)
    be = OrtDeviceBackend(bundle, "cuda", cudart=rt)
    lat = (C, 32, 32)
    assert be.session_for(graph_io.UNET, {graph_io.SAMPLE: (2, *lat)}) == ("unet None", (graph_io.UNET,), True)
    assert be.session_for(graph_io.UNET, {graph_io.SAMPLE: (4, *lat)})[0] == "unet None"  # one session for every batch
    sess, key, captured = be.session_for(graph_io.GUIDED_STEP, {graph_io.Z: (2, *lat), graph_io.EPS: (4, *lat),
                                                                graph_io.COEF: (3,)})
    # fixed at the call's batch and size: the spatial dimensions are named too, so each size gets its own capture
    assert captured and sess == "guided_step {'B': 2, '4*hm': 32, '4*wm': 32, '2*B': 4}"
    assert key == (graph_io.GUIDED_STEP, ("2*B", 4), ("4*hm", 32), ("4*wm", 32), ("B", 2))
    assert be.session_for(graph_io.GUIDED_STEP, {graph_io.Z: (1, *lat), graph_io.EPS: (2, *lat),
                                                 graph_io.COEF: (3,)})[0] == \
        "guided_step {'B': 1, '4*hm': 32, '4*wm': 32, '2*B': 2}"
    assert be.session_for(graph_io.GUIDED_STEP, {graph_io.Z: (1, C, 24, 32), graph_io.EPS: (2, C, 24, 32),
                                                 graph_io.COEF: (3,)})[0] == \
        "guided_step {'B': 1, '4*hm': 24, '4*wm': 32, '2*B': 2}"
    assert be.session_for(graph_io.VAE_DECODER, {graph_io.LATENT: (2, *lat)}) == ("vae_decoder None",
                                                                                  (graph_io.VAE_DECODER,), False)
    with pytest.raises(RuntimeError, match="No such file"):  # any other failure is not taken for a refusal
        monkeypatch.setattr(mod, "open_session", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("No such file")))
        be.session_for(graph_io.VAE_ENCODER, {graph_io.IMAGE: (2, 3, H, W)})
    stream = str(int(be._stream))
    assert all(o["user_compute_stream"] == stream and o["has_user_compute_stream"] == "1" for _, o, _ in opened)
    assert [(n, o["enable_cuda_graph"], d) for n, o, d in opened] == [
        ("unet", "1", None), ("guided_step", "1", None),
        ("guided_step", "1", {"B": 2, "2*B": 4, "4*hm": 32, "4*wm": 32}),
        ("guided_step", "1", {"B": 1, "2*B": 2, "4*hm": 32, "4*wm": 32}),
        ("guided_step", "1", {"B": 1, "2*B": 2, "4*hm": 24, "4*wm": 32}), ("vae_decoder", "1", None),
        ("vae_decoder", "1", {"B": 2, "4*hm": 32, "4*wm": 32}), ("vae_decoder", "0", None)]
    assert be.describe()["cuda_graphs"] == "per call (not vae_decoder)"
    be.close()
    assert [c.name for c in rt._fake_calls if not c.name.endswith("__int__")] == [
        "cudaStreamCreateWithFlags", "cudaDeviceSynchronize", "cudaStreamDestroy"]


def test_free_dims_read_the_named_batch_of_a_call() -> None:
    inputs = [("sample", ["2*B", 4, 8, 8]), ("timestep", [1]), ("tac_q_0", ["B", 64, 32])]
    assert free_dims(inputs, {"sample": (4, 4, 8, 8), "timestep": (1,), "tac_q_0": (2, 64, 32)}) == {"2*B": 4, "B": 2}
    with pytest.raises(ValueError, match="'B' is 2 and 3"):
        free_dims([("a", ["B"]), ("b", ["B"])], {"a": (2,), "b": (3,)})


def test_cuda_without_the_provider_names_the_gpu_extra(bundle, monkeypatch) -> None:
    from r2r.backends import backend_row
    from r2r.runtime.backend_ort import open_backend
    from r2r.runtime.select import DeviceUnavailable, resolve_device

    _cpu_only(monkeypatch)
    with pytest.raises(DeviceUnavailable, match=r"pip install 'r2r\[gpu\]'"):
        resolve_device(backend_row("onnxruntime"), "cuda")
    with pytest.raises(ProviderUnavailable, match=r"pip install 'r2r\[gpu\]'"):
        open_backend(bundle, "cuda", "fp32")
    with pytest.raises(ProviderUnavailable, match=r"pip install 'r2r\[gpu\]'"):
        OrtDeviceBackend(bundle, "cuda")


def test_select_uses_the_device_path_when_the_cuda_provider_is_there(bundle, monkeypatch) -> None:
    import r2r.runtime.backend_ort_device as mod
    from r2r.backends import backend_row
    from r2r.runtime.backend_ort import open_backend
    from r2r.runtime.select import resolve_device

    made = []
    monkeypatch.setattr(mod, "OrtDeviceBackend", lambda *a, **k: made.append((a, k)) or "device-backend")
    ort_row = backend_row("onnxruntime")
    _with_cuda(monkeypatch)
    assert resolve_device(ort_row, "auto") == "cuda"
    assert open_backend(bundle, "cuda", "fp32") == "device-backend"
    assert made[0][0][1] == "cuda"
    assert isinstance(open_backend(bundle, "cpu", "fp32"), OrtBackend)
    _cpu_only(monkeypatch)
    assert resolve_device(ort_row, "auto") == "cpu"
    with pytest.raises(ValueError, match="runs on cpu"):
        resolve_device(backend_row("openvino"), "cuda")


def test_host_backend_refuses_a_gpu_device(bundle) -> None:
    with pytest.raises(ValueError, match="binds host memory"):
        OrtBackend(bundle, device="cuda")


# ---- buffers ------------------------------------------------------------------------------------------------------

def test_views_upload_download_and_copy_bit_exact(bundle) -> None:
    be = OrtDeviceBackend(bundle, "cpu", threads=1)
    a, b = be.empty((3, 4)), be.empty((3, 4))
    assert be.allocations == 2 and a.host is None and a.ptr != b.ptr
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    be.upload(a, x)
    special = np.array([np.nan, np.inf, -0.0, 1e-45], np.float32)  # 1*z + 0*e would not keep these
    be.upload(a[1], special)
    x[1] = special
    assert np.array_equal(be.download(a), x, equal_nan=True)
    assert np.array_equal(be.download(a[1:]), x[1:], equal_nan=True)
    be.execute([be.copy(b[2], a[1]), be.copy(b[:2], a[:2])], key=0)
    got = be.download(b)
    assert np.array_equal(got[2].view(np.uint32), special.view(np.uint32))  # bit for bit, -0.0 and NaN included
    assert np.array_equal(got[:2], x[:2], equal_nan=True)
    assert {p.graph for p in be.prepared} == {f"{COPY_GRAPH}/float32"}
    foreign = OrtBackend(bundle).empty((3, 4))
    with pytest.raises(ValueError, match="not memory of this ONNX Runtime backend"):
        be.copy(b, foreign)
    with pytest.raises(ValueError, match="not memory of this ONNX Runtime backend"):
        be.upload(foreign, x)


# ---- the coupled scheduler ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fused", "fixed_batch"), [(False, False), (True, False), (False, True)],
                         ids=["emit-inject", "fused", "fixed-batch-sessions"])
def test_device_path_equals_the_host_path_on_the_embedded_default(bundle, renders, fused: bool,
                                                                  fixed_batch: bool) -> None:
    """Same graphs, same session options; the step graphs do the numpy updates' float32 operations in the same
    order and the copy is an Identity: the final images are bit-identical (recorded: max abs error 0). The
    fixed-batch sessions CUDA falls back to when capture is refused compute the same numbers."""
    host = CoupledScheduler(bundle, OrtBackend(bundle), 2, Method(), Variant(fused=fused))
    be = OrtDeviceBackend(bundle, "cpu")
    if fixed_batch:  # what session_for does on CUDA for a graph refused with its dynamic batch
        be._modes.update({g: "fixed" for g in [*bundle.manifest.graphs, f"{COPY_GRAPH}/float32"]})
    dev = CoupledScheduler(bundle, be, 2, Method(), Variant(fused=fused))
    if fixed_batch:
        fixed = [k for k, s in be._sessions.items() if s is not None and len(k[0]) > 1]
        assert {k[0][0] for k in fixed} >= {graph_io.UNET, graph_io.GUIDED_STEP, graph_io.DDIM_STEP,
                                            f"{COPY_GRAPH}/float32"}
    want, got = host(renders), dev(renders)
    raw_want, raw_got = host.backend.download(host.image_out), be.download(dev.image_out)
    max_abs = float(np.max(np.abs(raw_want - raw_got)))
    print(f"device path vs host path ({'fused' if fused else 'emit/inject'}{', fixed batch' * fixed_batch}): max "
          f"abs error {max_abs:g} (decoder output), PSNR "
          f"{min(psnr(g, w) for g, w in zip(got, want, strict=True)):.1f} dB (uint8)")
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w) or psnr(g, w) >= 60.0
    assert max_abs <= 1e-5


def test_the_program_is_device_calls_only_and_qk_stays_in_place(bundle) -> None:
    be = OrtDeviceBackend(bundle, "cpu")
    sched = CoupledScheduler(bundle, be, 2, Method())
    graphs = {p.graph for p in be.prepared}
    assert {graph_io.DDIM_STEP, graph_io.GUIDED_STEP, f"{COPY_GRAPH}/float32"} <= graphs  # no host arithmetic or copy
    assert all(a.host is None and a in be.buffers for p in be.prepared for a in p.bindings.values())
    names = graph_io.tac_names(len(bundle.tac_layers))
    emits = [p.bindings for p in be.prepared if p.graph == graph_io.UNET_EMIT]
    injects = [p.bindings for p in be.prepared if p.graph == graph_io.UNET_INJECT]
    assert len(emits) == len(injects) == sched.window
    for e, i in zip(emits, injects, strict=True):  # emit i's Q/K outputs are inject i's inputs: the same memory
        assert [(e[n].ptr, e[n].shape) for n in names] == [(i[n].ptr, i[n].shape) for n in names]
    coefs = {p.bindings[graph_io.COEF].ptr for p in be.prepared if p.graph in graph_io.STEP_GRAPHS}
    assert coefs == {sched.coefs[k].ptr for k in range(len(sched.coef_host))}  # the device coefficient rows


def test_no_ortvalue_is_created_once_the_program_is_prepared(bundle, renders, monkeypatch) -> None:
    be = OrtDeviceBackend(bundle, "cpu")
    sched = CoupledScheduler(bundle, be, 2, Method(steps=10, strength=0.5))
    prepared = be.allocations
    assert prepared == len(be.buffers)
    created: list[str] = []
    for factory in ("ortvalue_from_shape_and_type", "ortvalue_from_numpy"):
        real = getattr(ort.OrtValue, factory)
        monkeypatch.setattr(ort.OrtValue, factory,
                            staticmethod(lambda *a, _f=factory, _r=real, **k: created.append(_f) or _r(*a, **k)))
    sched(renders)  # upload, the whole program (first run), download
    sched.backend.execute(sched.plan.ops, key=id(sched))
    assert be.allocations == prepared
    assert created == []


def test_r2r_run_asks_for_the_gpu_extra_before_exporting_anything(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from r2r.runtime.cli import main

    _cpu_only(monkeypatch)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["--backend", "onnxruntime", "--device", "cuda", "--input", str(tmp_path / "x.png"),
                                    "--output", str(tmp_path / "out")])
    assert res.exit_code != 0 and "pip install 'r2r[gpu]'" in res.output
    assert not (tmp_path / "cache").exists()
