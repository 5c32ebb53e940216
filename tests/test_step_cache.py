"""Step caching as an exported program variant (docs/design.md, "Less work per image"): the split UNet is the UNet;
the embedded default's step-cache bundle follows the PyTorch reference with the same cache interval at the 45 dB bar
on ONNX Runtime, the torch backend and the TensorRT simulation; `r2r-run --cache-interval` finds or exports that
bundle, passes its canaries and records the interval; a bundle without the graphs, a program other than the fused
one and an interval out of range are refused; interval 1 is today's program; the interval is the model's own
default (the embedded default's 3) wherever the program can cache, and a model made from it starts at 1."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support import gpu_sim
from support.bundles import copy_bundle, set_batch_dims
from support.engines import RecordingBackend

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.manifest import BundleError, read_manifest
from r2r.metrics import psnr
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
from r2r.reference import ReferencePipeline
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.outputs import PARAMS_KEY
from r2r.runtime.scheduler import CoupledScheduler, StepCacheUnsupported, program_graphs
from r2r.step_cache import full_calls, shallow_layers, unet_split
from r2r.tac import install_tac, plan_tac

W = H = 256
FUSED = Variant(fused=True)


@pytest.fixture(scope="module")
def renders() -> list[np.ndarray]:
    from r2r.training.data import render_pair, sample_design

    return [render_pair(sample_design(np.random.default_rng([13, i]), (W, H)), (W, H))[0] for i in range(2)]


@pytest.fixture(scope="module")
def reference(renders) -> Callable[[int], list[np.ndarray]]:
    """`reference(k)`: the PyTorch reference's outputs at cache interval k, each computed once."""
    pipe = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, W, H)
    return functools.cache(lambda k: pipe(renders, Method(cache_interval=k)))


def test_the_split_unet_is_the_unet_and_a_shallow_call_on_its_own_features_is_the_whole_call() -> None:
    unet = load_components(EMBEDDED_DEFAULT).unet
    g = torch.Generator().manual_seed(0)
    x, t, ehs = torch.randn(3, 8, 32, 32, generator=g), torch.tensor([261.0]), torch.randn(3, 77, 64, generator=g)
    for pool in (1, 2):  # the pool's grid comes from the conv_in hook, which the split runs too
        install_tac(unet, plan_tac(unet.config, W, H, 256, pool))
        with torch.no_grad():
            want = unet(x, t, encoder_hidden_states=ehs).sample
            eps, deep = unet_split(unet, x, t, ehs)
            again, same = unet_split(unet, x, t, ehs, deep)
            moved, _ = unet_split(unet, x + 0.1, t, ehs, deep)
        assert torch.equal(eps, want) and torch.equal(again, want) and same is deep
        assert deep.shape == (3, 64, 32, 32)
        assert not torch.equal(moved, unet_split(unet, x + 0.1, t, ehs)[0])  # stale features: an approximation


def test_each_branch_refreshes_its_cache_every_k_calls_from_the_first() -> None:
    assert full_calls(5, 1) == (True,) * 5
    assert full_calls(7, 3) == (True, False, False, True, False, False, True)
    with pytest.raises(ValueError, match=r"cache_interval must be in \[1, 10\]"):
        Method(cache_interval=11)
    config = load_components(EMBEDDED_DEFAULT).unet.config
    plan = plan_tac(config, W, H, 256)
    # the first level's TAC layers (first down block, last up block) are in the shallow path, the second's are not
    assert {lyr.level for lyr in plan.layers} == {0, 1}
    assert {i for i, lyr in enumerate(plan.layers) if lyr.level == 0} == shallow_layers(plan, config)


def test_the_step_cached_default_program_follows_its_reference_at_45_db(default_bundle: Path, reference,
                                                                       renders) -> None:
    b = open_bundle(default_bundle)
    from r2r.runtime.verify import verify_graphs

    assert b.step_cache and set(b.manifest.graphs) == {*graph_io.STEP_CACHE_GRAPHS, graph_io.VAE_ENCODER,
                                                        graph_io.VAE_DECODER, *graph_io.STEP_GRAPHS}
    verified = verify_graphs(OrtBackend(b), b, program_graphs(FUSED, step_cache=True))  # canaries recorded, passed
    assert {r.graph for r in verified.results} == {*graph_io.STEP_CACHE_GRAPHS, graph_io.VAE_ENCODER,
                                                   graph_io.VAE_DECODER}
    for k in (2, 3):
        sched = CoupledScheduler(b, OrtBackend(b), 2, b.method(Method(cache_interval=k)), FUSED)
        got = sched(renders)
        whole = sum(full_calls(15, k))
        assert dict(sched.plan.graph_calls) == {graph_io.UNET_DEEP: 2 * whole, graph_io.UNET_SHALLOW: 30 - 2 * whole}
        for g, e, f in zip(got, reference(k), reference(1), strict=True):
            db = psnr(g, e)
            print(f"cache interval {k}: ONNX Runtime fp32 vs its reference {db:.1f} dB (the reference vs the full "
                  f"method {psnr(e, f):.1f} dB)")
            assert db >= 45.0
            assert psnr(e, f) < db  # the cache changes the image more than the export does: the check can fail


def test_the_torch_backend_runs_the_step_cached_program(default_bundle: Path, reference, renders) -> None:
    from r2r.runtime.backend_torch import TorchBackend

    b = open_bundle(default_bundle)
    got = CoupledScheduler(b, TorchBackend(b, EMBEDDED_DEFAULT, "cpu", "fp32"), 2, b.method(Method(cache_interval=2)),
                           FUSED)(renders)
    for g, e in zip(got, reference(2), strict=True):
        assert psnr(g, e) >= 45.0


def test_the_program_binds_each_branch_its_own_features_at_the_contracts_multiples(default_bundle: Path) -> None:
    """The inversion's whole calls write the [B] features its shallow calls read; the generation's fused calls
    write [cg, neg, null] and the pair after the window reads their tail; every call at graph_io.CALL_MULTIPLES."""
    b = open_bundle(default_bundle)
    be = RecordingBackend(b)
    sched = CoupledScheduler(b, be, 2, b.method(Method(cache_interval=2)), FUSED)
    unet_calls = [(g, binds) for g, binds in be.calls if g in graph_io.STEP_CACHE_GRAPHS]
    inversion, generation = unet_calls[:15], unet_calls[15:]
    assert {binds[graph_io.DEEP] for _, binds in inversion} == {(sched.deep_inv.ptr, sched.deep_inv.shape)}
    fused = {binds[graph_io.DEEP] for _, binds in generation[:sched.window]}
    tail = sched.deep_gen[2:]
    assert fused == {(sched.deep_gen.ptr, sched.deep_gen.shape)}
    assert {binds[graph_io.DEEP] for _, binds in generation[sched.window:]} == {(tail.ptr, tail.shape)}
    assert [g for g, _ in unet_calls[:4]] == [graph_io.UNET_DEEP, graph_io.UNET_SHALLOW] * 2
    for graph, binds in unet_calls:
        multiple = binds[graph_io.SAMPLE][1][0] // 2
        assert multiple in graph_io.CALL_MULTIPLES[graph]


def test_the_tensorrt_path_runs_the_step_cached_program_as_onnx_runtime_does(default_bundle: Path, renders,
                                                                            tmp_path: Path) -> None:
    """The simulation runs the bundle's graphs at the device addresses bound: bit for bit OrtBackend's, canaries
    passed through the engines."""
    from r2r.runtime.backend_trt import TrtBackend
    from r2r.runtime.verify import verify_graphs

    root = copy_bundle(default_bundle, tmp_path / "bundle")
    for graph in read_manifest(root).graphs:
        set_batch_dims(root, graph, None)
    gpu_sim.build_sim_engines(root, "fp32")
    b = open_bundle(root)
    method = b.method(Method(cache_interval=2))
    want = CoupledScheduler(b, OrtBackend(b), 1, method, FUSED)(renders[:1])
    trt, cudart = gpu_sim.sim_modules(root)
    with TrtBackend(b, "fp32", trt=trt, cudart=cudart) as backend:
        verified = verify_graphs(backend, b, program_graphs(FUSED, step_graphs=True, step_cache=True))
        assert {r.graph for r in verified.results} >= set(graph_io.STEP_CACHE_GRAPHS)
        got = CoupledScheduler(b, backend, 1, method, FUSED)(renders[:1])
    assert np.array_equal(got[0], want[0])


def test_r2r_run_with_a_cache_interval_uses_the_step_cache_bundle_and_records_it(
        default_bundle: Path, r2r_cache: Path, renders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r2r.runtime.cli import main

    monkeypatch.setenv("R2R_CACHE", str(r2r_cache))
    (tmp_path / "in").mkdir()
    Image.fromarray(renders[0]).save(tmp_path / "in" / "shirt.png")
    before = sorted(p.name for p in (r2r_cache / "bundles").iterdir())
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                    "--cache-interval", "2", "--backend", "onnxruntime", "--steps", "10",
                                    "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (r2r_cache / "bundles").iterdir()) == before  # found, not exported again
    params = json.loads(Image.open(tmp_path / "out" / "shirt.png").text[PARAMS_KEY])
    assert params["cache_interval"] == 2 and default_bundle.name.endswith("-stepcache")
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"),
                                    "--cache-interval", "11"])
    assert res.exit_code == 2 and "--cache-interval" in res.output


def test_what_cannot_cache_refuses_it_by_name(embedded_bundle: Path, renders, tmp_path: Path) -> None:
    from r2r.runtime.cli import main

    Image.fromarray(renders[0]).save(tmp_path / "shirt.png")
    b = open_bundle(embedded_bundle)
    assert not b.step_cache
    with pytest.raises(BundleError, match="r2r-export onnx --step-cache"):
        b.check(Method(cache_interval=2), 1)
    with pytest.raises(StepCacheUnsupported, match="fused program"):
        CoupledScheduler(open_bundle(embedded_bundle), OrtBackend(b), 1, Method(cache_interval=2), Variant())
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "shirt.png"), "--output", str(tmp_path / "out"),
                                    "--cache-interval", "2", "--fused", "off"])
    assert res.exit_code != 0 and "step caching runs in the fused program" in res.output
    with pytest.raises(ValueError, match="cache_interval must be in"):
        Method(cache_interval=0)


def test_interval_1_is_todays_program(embedded_bundle: Path) -> None:
    """K = 1 binds the routed `unet` exactly as before (no step-cache graph, no feature buffer): today's numbers."""
    b = open_bundle(embedded_bundle)

    def program(method: Method) -> tuple[list, CoupledScheduler]:
        be = RecordingBackend(b)
        sched = CoupledScheduler(b, be, 1, b.method(method), FUSED)
        return [(g, {name: shape for name, (_, shape) in binds.items()}) for g, binds in be.calls], sched

    before, _ = program(Method())
    after, sched = program(Method(cache_interval=1))
    assert after == before and not sched.cached
    assert {g for g, _ in after} == set(program_graphs(FUSED)) and sched.unet_evaluations_per_image == 58


def test_a_models_defaults_file_sets_its_interval_and_a_bad_one_is_refused_by_name(tmp_path: Path) -> None:
    from r2r.models import DEFAULTS_FILE, ModelDefaults, ModelLoadError, model_defaults, write_derived_defaults

    assert model_defaults(EMBEDDED_DEFAULT) == ModelDefaults(256, 256, 3)  # measured within its bar (README)
    assert model_defaults(tmp_path) == ModelDefaults(768, 1024, 1)  # none: SD 1.5's public defaults, no caching
    for bad in ('{"width": 256, "height": 256, "cache_interval": 0}', '{"width": 250, "height": 256}',
                '{"width": "x", "height": 256}', "[1, 2]", "{"):
        (tmp_path / DEFAULTS_FILE).write_text(bad)
        with pytest.raises(ModelLoadError, match=DEFAULTS_FILE):
            model_defaults(tmp_path)
    derived = tmp_path / "derived"
    derived.mkdir()
    write_derived_defaults(EMBEDDED_DEFAULT, derived)  # new weights keep the size, not the measured interval
    assert model_defaults(derived) == ModelDefaults(256, 256, 1)


def test_the_embedded_defaults_export_carries_the_step_cache_pair_unless_graphs_are_named(tiny_model_dir) -> None:
    from r2r.export.cli import bundle_graphs

    pair = set(graph_io.STEP_CACHE_GRAPHS)
    assert set(bundle_graphs(EMBEDDED_DEFAULT)) == set(graph_io.DEFAULT_GRAPHS) | pair
    assert set(bundle_graphs(tiny_model_dir)) == set(graph_io.DEFAULT_GRAPHS)  # random weights: no interval
    assert bundle_graphs(EMBEDDED_DEFAULT, ("unet", "vae_decoder")) == ("unet", "vae_decoder")
    assert set(bundle_graphs(tiny_model_dir, ("unet",), step_cache=True)) == {"unet"} | pair


def test_a_bundle_completes_the_interval_with_its_models_where_it_and_the_program_can_cache(
        default_bundle: Path, embedded_bundle: Path) -> None:
    b = open_bundle(default_bundle)
    assert b.cache_interval == 3 and b.method(Method()).cache_interval == 3
    assert b.method(Method(cache_interval=1)).cache_interval == 1  # given: kept
    assert b.method(Method(), step_cache=False).cache_interval == 1  # a program that cannot cache: off
    plain = open_bundle(embedded_bundle)  # the same model's defaults, without the pair: off
    assert plain.manifest.schedule["defaults"]["cache_interval"] == 3 and plain.method(Method()).cache_interval == 1


def test_r2r_run_on_the_embedded_default_step_caches_by_default_where_the_program_can(
        default_bundle: Path, embedded_bundle: Path, r2r_cache: Path, renders, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from r2r.runtime.cli import main

    monkeypatch.setenv("R2R_CACHE", str(r2r_cache))
    Image.fromarray(renders[0]).save(tmp_path / "shirt.png")
    before = sorted(p.name for p in (r2r_cache / "bundles").iterdir())
    quick = ["--steps", "10", "--strength", "0.5"]

    def run(name: str, *flags: str) -> dict:
        res = CliRunner().invoke(main, ["--input", str(tmp_path / "shirt.png"), "--output", str(tmp_path / name),
                                        *quick, *flags])
        assert res.exit_code == 0, res.output
        return json.loads(Image.open(tmp_path / name / "shirt.png").text[PARAMS_KEY])

    made = run("default", "--backend", "onnxruntime")
    assert made["cache_interval"] == 3 and made["bundle_sha256"] == open_bundle(default_bundle).sha256
    assert run("full", "--backend", "onnxruntime", "--cache-interval", "1")["cache_interval"] == 1
    assert run("unfused", "--backend", "onnxruntime", "--fused", "off")["cache_interval"] == 1
    assert sorted(p.name for p in (r2r_cache / "bundles").iterdir()) == before  # the session's bundles serve them
    assert run("oracle", "--backend", "reference")["cache_interval"] == 3  # the reference: the same program
    assert run("oracle-sp", "--backend", "reference", "--inversion", "single-pass")["cache_interval"] == 1
