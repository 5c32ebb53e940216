"""ONNX export parity: every graph against PyTorch on fresh random inputs.

Relative error here is max|onnx - torch| / max|torch| over a whole tensor (element-wise relative
error is meaningless where values cross zero); the bound is 1e-4 for every output, Q/K included.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from r2r import graph_io
from r2r.export.bundle_writer import ExportConfig, export_bundle
from r2r.manifest import read_manifest, verify_files
from r2r.models import encode_conditioning
from r2r.tac import TACMode, install_tac, plan_tac
from r2r.tiny import LATENT_CHANNELS as C

W = H = 256
BOUND = 1e-4


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own copy: its tests tamper with files and build engines into it."""
    return Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("export") / "bundle"))


@pytest.fixture(scope="module")
def torch_unet(tiny_components):
    unet = copy.deepcopy(tiny_components.unet)
    plan = plan_tac(unet.config, W, H, 256)
    return unet, plan, install_tac(unet, plan)


def _session(bundle: Path, name: str) -> ort.InferenceSession:
    m = read_manifest(bundle)
    return ort.InferenceSession(str(bundle / m.graphs[name].file), providers=["CPUExecutionProvider"])


def _rel(got: np.ndarray, ref: torch.Tensor) -> float:
    r = ref.detach().numpy()
    if got.ndim == r.ndim + 1:  # TAC Q/K: the graphs' [B, h_l, w_l, C] against PyTorch's [B, N, C]
        got = got.reshape(got.shape[0], -1, got.shape[-1])
    return float(np.abs(got - r).max() / max(np.abs(r).max(), 1e-12))


def _inputs(batch: int, seed: int, height: int = H, width: int = W) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {graph_io.SAMPLE: torch.randn(batch, C, height // 8, width // 8, generator=g),
            graph_io.TIMESTEP: torch.tensor([float(torch.randint(1, 1000, (1,), generator=g))]),
            graph_io.ENCODER_HIDDEN_STATES: torch.randn(batch, 77, 64, generator=g)}


def _np(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in d.items()}


def _run_torch(unet, state, mode, x, injected=()):
    state.mode, state.injected = mode, injected
    try:
        with torch.no_grad():
            eps = unet(x[graph_io.SAMPLE], x[graph_io.TIMESTEP],
                       encoder_hidden_states=x[graph_io.ENCODER_HIDDEN_STATES]).sample
            qk = state.take_captured() if mode is TACMode.CAPTURE else []
    finally:
        state.mode, state.injected = TACMode.OFF, ()
    return eps, qk


def test_manifest_names_every_graph_with_the_contract_io(bundle: Path) -> None:
    m = read_manifest(bundle)
    assert set(m.graphs) == set(graph_io.DEFAULT_GRAPHS)
    n = len(m.tac_plan["layers"])
    assert n == 6
    emit = m.graphs[graph_io.UNET_EMIT]
    assert [t.name for t in emit.outputs] == [graph_io.EPS, *graph_io.tac_names(n)]
    assert [t.shape for t in emit.outputs[1:3]] == [["B", "4*hm", "4*wm", 32]] * 2  # level 0: 32x32 at 256x256
    inject = m.graphs[graph_io.UNET_INJECT]
    assert [t.name for t in inject.inputs] == [graph_io.SAMPLE, graph_io.TIMESTEP, graph_io.ENCODER_HIDDEN_STATES,
                                               *graph_io.tac_names(n)]
    assert inject.inputs[0].shape == ["2*B", C, "4*hm", "4*wm"]
    assert m.sizes == {"multiple": 32, "min": [64, 64], "opt": [W, H], "max": [2048, 2048], "static": False}
    unet = m.graphs[graph_io.UNET]
    assert [(t.name, t.shape, t.dtype) for t in unet.inputs][-1] == (graph_io.TAC_SRC, ["B"], "int64")
    verify_files(bundle, m)
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["source"]["embedding_sha256"] and raw["schedule"]["defaults"]["steps"] == 50


@pytest.mark.parametrize("batch", [1, 3])
def test_unet_and_emit_match_torch_including_every_qk(bundle: Path, torch_unet, batch: int) -> None:
    unet, _, state = torch_unet
    x = _inputs(batch, batch)
    eps, qk = _run_torch(unet, state, TACMode.CAPTURE, x)
    out = _session(bundle, graph_io.UNET_EMIT).run(None, _np(x))
    assert _rel(out[0], eps) < BOUND
    flat = [t for pair in qk for t in pair]
    assert len(out) == 1 + len(flat)
    for got, ref, layer in zip(out[1:], flat, [lyr for lyr in m_layers(bundle) for _ in (0, 1)], strict=True):
        assert got.shape == (batch, H // 8 >> layer["level"], W // 8 >> layer["level"], ref.shape[-1])
        assert _rel(got, ref) < BOUND
    plain = _session(bundle, graph_io.UNET).run(None,
                                                _np(x) | {graph_io.TAC_SRC: np.arange(batch)})[0]  # identity routing
    assert _rel(plain, eps) < BOUND


def m_layers(bundle: Path) -> list[dict]:
    return read_manifest(bundle).tac_plan["layers"]


@pytest.mark.parametrize(("height", "width"), [(192, 256), (256, 96), (320, 224)])
def test_the_graphs_take_other_sizes_of_the_range_with_the_same_parity(bundle: Path, torch_unet, height: int,
                                                                       width: int) -> None:
    """One dynamic-size bundle: emit, inject and the routed unet at sizes other than the export's, each against
    PyTorch at that size (the TAC plan is the same at every multiple of the pixel multiple)."""
    unet, plan, state = torch_unet
    assert [lyr.name for lyr in plan_tac(unet.config, width, height, 256).layers] == [lyr.name for lyr in plan.layers]
    cg, pair = _inputs(2, 40, height, width), _inputs(4, 41, height, width)
    pair[graph_io.TIMESTEP] = cg[graph_io.TIMESTEP]
    eps, qk = _run_torch(unet, state, TACMode.CAPTURE, cg)
    emit = _session(bundle, graph_io.UNET_EMIT).run(None, _np(cg))
    for got, ref in zip(emit, [eps, *[t for p in qk for t in p]], strict=True):
        assert _rel(got, ref) < BOUND
    ref, _ = _run_torch(unet, state, TACMode.INJECT, pair, qk)
    feeds = _np(pair) | dict(zip(graph_io.tac_names(len(plan.layers)), emit[1:], strict=True))
    assert _rel(_session(bundle, graph_io.UNET_INJECT).run(None, feeds)[0], ref) < BOUND
    routed = _session(bundle, graph_io.UNET).run(None, _np(cg) | {graph_io.TAC_SRC: np.arange(2)})[0]
    assert _rel(routed, eps) < BOUND


def test_inject_fed_with_emit_qk_equals_the_torch_tac_pass(bundle: Path, torch_unet) -> None:
    unet, plan, state = torch_unet
    cg = _inputs(2, 10)
    pair = _inputs(4, 11)
    pair[graph_io.TIMESTEP] = cg[graph_io.TIMESTEP]
    emit = _session(bundle, graph_io.UNET_EMIT).run(None, _np(cg))
    feeds = _np(pair) | dict(zip(graph_io.tac_names(len(plan.layers)), emit[1:], strict=True))
    got = _session(bundle, graph_io.UNET_INJECT).run(None, feeds)[0]
    _, qk = _run_torch(unet, state, TACMode.CAPTURE, cg)
    ref, _ = _run_torch(unet, state, TACMode.INJECT, pair, qk)
    assert _rel(got, ref) < BOUND
    untouched, _ = _run_torch(unet, state, TACMode.OFF, pair)
    assert _rel(got[2:], untouched[2:]) > 1e-3  # the null half really was controlled


def test_routed_fused_step_equals_emit_then_inject(bundle: Path, torch_unet) -> None:
    """The routed unet on [cg, neg, null] with the null rows pointing at the cg rows is the fused TAC step."""
    _, plan, _ = torch_unet
    cg, pair = _inputs(2, 20), _inputs(4, 21)
    pair[graph_io.TIMESTEP] = cg[graph_io.TIMESTEP]
    emit = _session(bundle, graph_io.UNET_EMIT).run(None, _np(cg))
    feeds = _np(pair) | dict(zip(graph_io.tac_names(len(plan.layers)), emit[1:], strict=True))
    two_calls = _session(bundle, graph_io.UNET_INJECT).run(None, feeds)[0]
    fused_in = {graph_io.SAMPLE: np.concatenate([cg[graph_io.SAMPLE].numpy(), pair[graph_io.SAMPLE].numpy()]),
                graph_io.TIMESTEP: cg[graph_io.TIMESTEP].numpy(),
                graph_io.ENCODER_HIDDEN_STATES: np.concatenate([cg[graph_io.ENCODER_HIDDEN_STATES].numpy(),
                                                          pair[graph_io.ENCODER_HIDDEN_STATES].numpy()]),
                graph_io.TAC_SRC: np.array([0, 1, 2, 3, 0, 1], np.int64)}
    fused = _session(bundle, graph_io.UNET).run(None, fused_in)[0]
    assert np.abs(fused[2:] - two_calls).max() / np.abs(two_calls).max() < BOUND
    assert np.abs(fused[:2] - emit[0]).max() / np.abs(emit[0]).max() < BOUND


def test_vae_graphs_match_torch(bundle: Path, tiny_components) -> None:
    vae = tiny_components.vae
    g = torch.Generator().manual_seed(5)
    img = torch.rand(2, 3, H, W, generator=g) * 2 - 1
    with torch.no_grad():
        ref_lat = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
        lat = torch.randn(3, C, H // 8, W // 8, generator=g)
        ref_img = (vae.decode(lat / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert _rel(_session(bundle, graph_io.VAE_ENCODER).run(None, {graph_io.IMAGE: img.numpy()})[0], ref_lat) < BOUND
    assert _rel(_session(bundle, graph_io.VAE_DECODER).run(None, {graph_io.LATENT: lat.numpy()})[0], ref_img) < BOUND


def test_conditioning_in_the_bundle_equals_the_reference_encoding(bundle: Path, tiny_components,
                                                                 tiny_model_dir: Path) -> None:
    cond = load_file(bundle / read_manifest(bundle).cond["file"])
    c_null, c_neg = encode_conditioning(tiny_components, tiny_model_dir / "negative_embedding.safetensors")
    assert torch.equal(cond[graph_io.COND_NULL], c_null) and torch.equal(cond[graph_io.COND_NEG], c_neg)


def test_rerun_with_unchanged_inputs_rebuilds_nothing(bundle: Path, tiny_model_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*.onnx")}
    lines: list[str] = []
    export_bundle(ExportConfig(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", bundle, W, H,
                               batch_max=4), progress=lines.append)
    assert all("up to date" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*.onnx")} == before


def test_a_tampered_graph_is_detected_and_rebuilt(bundle: Path, tiny_model_dir: Path) -> None:
    m = read_manifest(bundle)
    path = bundle / m.graphs[graph_io.VAE_DECODER].file
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="do not match"):
        verify_files(bundle, m)
    lines: list[str] = []
    export_bundle(ExportConfig(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", bundle, W, H,
                               batch_max=4), progress=lines.append)
    rebuilt = [line for line in lines if "exported" in line]
    assert len(rebuilt) == 1 and graph_io.VAE_DECODER in rebuilt[0]
    verify_files(bundle, read_manifest(bundle))


def test_an_export_of_fewer_graphs_leaves_a_bundle_of_those_alone(tiny_bundle: Path, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    """`r2r-export onnx --graph ...` on a bundle of more graphs: the kept ones are up to date, the others' files and
    canaries go, and what is left verifies."""
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    kept = (graph_io.UNET, graph_io.VAE_ENCODER, graph_io.VAE_DECODER)
    lines: list[str] = []
    export_bundle(ExportConfig(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", out, W, H,
                               batch_max=4, graphs=kept), progress=lines.append)
    assert not any("exported" in line for line in lines), lines
    m = read_manifest(out)
    assert set(m.graphs) == set(kept) and {e["graph"] for e in m.canaries.values()} == set(kept)
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted((*kept, graph_io.TEXT_ENCODER))  # it stays
    verify_files(out, m)


def test_a_graph_of_the_same_key_is_copied_from_a_donor_bundle_unless_its_files_changed(
        tiny_bundle: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same model's other bundles give the graphs they share (r2r-run's cache passes them): copied with their
    recorded hashes, checked after the copy; a donor whose file no longer matches its manifest gives nothing."""
    def export(out: Path, donor: Path) -> tuple[list[str], object]:
        lines: list[str] = []
        m = export_bundle(ExportConfig(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", out, W, H,
                                       batch_max=4, graphs=(graph_io.VAE_DECODER,), donors=(donor,)),
                          progress=lines.append)
        return lines, m

    lines, m = export(tmp_path / "copied", tiny_bundle)
    donor = read_manifest(tiny_bundle)
    assert any("copied" in line and graph_io.VAE_DECODER in line for line in lines), lines
    assert any("copied" in line and graph_io.TEXT_ENCODER in line for line in lines), lines
    assert not any("exported" in line for line in lines)
    assert m.graphs[graph_io.VAE_DECODER] == donor.graphs[graph_io.VAE_DECODER]
    verify_files(tmp_path / "copied", read_manifest(tmp_path / "copied"))
    changed = Path(shutil.copytree(tiny_bundle, tmp_path / "changed"))
    graph = changed / donor.graphs[graph_io.VAE_DECODER].file
    graph.write_bytes(graph.read_bytes() + b"\0")
    lines, _ = export(tmp_path / "exported", changed)
    assert any("exported" in line and graph_io.VAE_DECODER in line for line in lines), lines


def test_onnxruntime_engines_fuse_attention_keep_parity_and_are_not_rebuilt(bundle: Path, torch_unet) -> None:
    """The ORT engines run every attention as com.microsoft.MultiHeadAttention (separate Q, K, V; no mask): no
    Softmax is left, and eps and every Q/K output stay within the export bound of PyTorch."""
    from r2r.engines.onnxruntime import build_ort_engines, session_options

    built = build_ort_engines(bundle, "fp32", "cpu", graphs=[graph_io.UNET, graph_io.UNET_EMIT],
                              progress=lambda s: None)
    assert [e.graph for e in built] == [graph_io.UNET, graph_io.UNET_EMIT]
    attentions = sum(1 for n in onnx.load(str(bundle / "onnx/unet/unet.onnx")).graph.node if n.op_type == "Softmax")
    for e in built:
        nodes = onnx.load(str(bundle / e.files[0])).graph.node
        mha = [n for n in nodes if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
        assert len(mha) == attentions == e.info["multi_head_attention"] > 0
        assert not [n for n in nodes if n.op_type == "Softmax"]
        assert all(len([i for i in n.input if i]) == 3 for n in mha)  # query, key, value; no mask, no bias
    so = session_options(ort, preoptimized=True)
    emit = ort.InferenceSession(str(bundle / built[1].files[0]), sess_options=so, providers=["CPUExecutionProvider"])
    unet, _, state = torch_unet
    x = _inputs(2, 30)
    eps, qk = _run_torch(unet, state, TACMode.CAPTURE, x)
    out = emit.run(None, _np(x))
    for got, ref in zip(out, [eps, *[t for pair in qk for t in pair]], strict=True):
        assert _rel(got, ref) < BOUND
    routed = ort.InferenceSession(str(bundle / built[0].files[0]), sess_options=so, providers=["CPUExecutionProvider"])
    assert _rel(routed.run(None, _np(x) | {graph_io.TAC_SRC: np.arange(2)})[0], eps) < BOUND
    lines: list[str] = []
    build_ort_engines(bundle, "fp32", "cpu", graphs=[graph_io.UNET_EMIT], progress=lines.append)
    assert len(lines) == 1 and "up to date" in lines[0]
    assert read_manifest(bundle).engines[f"onnxruntime/cpu-fp32/{graph_io.UNET_EMIT}"].info["provider"] == \
        "CPUExecutionProvider"


def test_export_examples_take_the_latent_channels_from_the_model_not_sd1_default() -> None:
    from types import SimpleNamespace

    from r2r.export.bundle_writer import example_inputs
    from r2r.tac import TACPlan

    comps = SimpleNamespace(text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=64)),
                            unet=SimpleNamespace(config=SimpleNamespace(in_channels=8)),
                            vae=SimpleNamespace(config=SimpleNamespace(latent_channels=8)))
    plan = TACPlan(layers=(), width=64, height=64, divisor=256)
    for name in (graph_io.UNET, graph_io.UNET_EMIT, graph_io.UNET_INJECT, graph_io.DDIM_STEP, graph_io.GUIDED_STEP,
                 graph_io.VAE_DECODER):
        latents = example_inputs(name, comps, plan, 64, 64)
        assert latents[0].shape[1:] == (8, 8, 8), name
