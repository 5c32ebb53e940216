"""`r2r-export refit` (engines/bundle_refit.py, export/graph_refit.py): a refittable bundle of the embedded default with
LoRA A, refitted to LoRA B, is the fresh export of B: the same keys and source, and the same images on ONNX Runtime and
on TensorRT (the CPU simulation, whose engines run only if they hold their graph file's weights,
tests/support/gpu_sim.py); TensorRT engines take only the weights that changed; an interrupted refit is refused by the
runtime and finished by a second run; bundles that cannot be refitted are refused before anything changes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import gpu_sim
from support.loras import unet_lora

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.manifest import BundleError, read_manifest

GRAPHS = (graph_io.UNET, graph_io.VAE_ENCODER, graph_io.VAE_DECODER, graph_io.DDIM_STEP,
          graph_io.GUIDED_STEP)  # the fused program's


@dataclass
class Setup:
    lora_a: Path
    model_b: Path
    lora_b: Path
    bundle_a: Path  # LoRA A, refittable, ONNX Runtime engines and refittable (simulated) TensorRT engines
    fresh_b: Path  # LoRA B exported afresh, with the same engines
    cache: Path


def _export(model: Path, out: Path, refit: bool) -> Path:
    from r2r.engines.onnxruntime import build_ort_engines
    from r2r.engines.tensorrt import TrtBuildConfig, build_bundle_engines
    from r2r.export.bundle_writer import ExportConfig, export_bundle

    quiet = {"progress": lambda s: None}
    export_bundle(ExportConfig(model, model / "negative_embedding.safetensors", out, 256, 256, 1, 256, GRAPHS,
                               refit=refit), **quiet)
    build_ort_engines(out, **quiet)
    build_bundle_engines(out, TrtBuildConfig("fp32", refit=refit), trt=gpu_sim.fake_tensorrt(out),
                         gpu=gpu_sim.SIM_GPU, **quiet)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from r2r.lora import LoraSpec, fuse_loras
    from r2r.models import EMBEDDED_DEFAULT

    root = tmp_path_factory.mktemp("refit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R2R_CACHE", str(root / "cache"))
        lora_a, lora_b = unet_lora(root / "a", 3), unet_lora(root / "b", 4)
        model_a, model_b = (fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(f)], progress=lambda s: None)
                            for f in (lora_a, lora_b))
        yield Setup(lora_a, model_b, lora_b, _export(model_a, root / "bundle-a", True),
                    _export(model_b, root / "fresh-b", False), root / "cache")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _ort_image(bundle: Path, image: np.ndarray) -> np.ndarray:
    from r2r.runtime.backend_ort import OrtBackend
    from r2r.runtime.bundle_reader import open_bundle
    from r2r.runtime.scheduler import CoupledScheduler

    b = open_bundle(bundle)
    return CoupledScheduler(b, OrtBackend(b), 1, Method(), Variant(fused=True))([image])[0]


def _trt_image(bundle: Path, image: np.ndarray) -> np.ndarray:
    from r2r.runtime.backend_trt import TrtBackend
    from r2r.runtime.bundle_reader import open_bundle
    from r2r.runtime.scheduler import CoupledScheduler

    b = open_bundle(bundle)
    trt, cudart = gpu_sim.sim_modules(bundle)
    backend = TrtBackend(b, "fp32", trt=trt, cudart=cudart)
    try:
        return CoupledScheduler(b, backend, 1, Method(), Variant(fused=True))([image])[0]
    finally:
        backend.close()


def _refit(bundle: Path, setup: Setup, **kwargs):
    from r2r.engines.bundle_refit import refit_bundle

    return refit_bundle(bundle, setup.model_b, setup.model_b / "negative_embedding.safetensors",
                        trt=kwargs.pop("trt", None) or gpu_sim.fake_tensorrt(bundle), gpu=gpu_sim.SIM_GPU,
                        progress=lambda s: None, **kwargs)


def test_refit_from_lora_a_to_lora_b_equals_the_fresh_export_of_b(setup: Setup, tmp_path: Path,
                                                                  stripes_image) -> None:
    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    image = stripes_image(5)
    before = _ort_image(bundle, image)
    report = _refit(bundle, setup)
    got, want = read_manifest(bundle), read_manifest(setup.fresh_b)
    # the fresh export's bundle, key for key: graphs, conditioning, source
    assert {g: e.key for g, e in got.graphs.items()} == {g: e.key for g, e in want.graphs.items()}
    assert got.cond["key"] == want.cond["key"] and got.source == want.source
    # only the UNet holds the LoRA: only its graph changed, only its TensorRT engine was refitted
    assert list(report.graphs) == [graph_io.UNET] and report.graphs[graph_io.UNET] > 0
    assert report.tensorrt == [f"{graph_io.UNET} (fp32)"]
    refit_info = got.engines["tensorrt/fp32/unet"].info["last_refit"]
    assert refit_info["weights_set"] == report.graphs[graph_io.UNET]  # the weights that changed, no more
    assert report.rebuilt == [["onnxruntime", "fp32", "cpu"]]
    # TensorRT engines keyed as a fresh build of the refitted graph with the same settings would be
    from r2r.engines.tensorrt import TrtBuildConfig, engine_key, profile_envs

    entry = got.engines["tensorrt/fp32/unet"]
    envs = profile_envs(got, graph_io.UNET, 1, "range")
    assert entry.key == engine_key(got.graphs[graph_io.UNET].key, TrtBuildConfig("fp32", refit=True),
                                   gpu_sim.fake_tensorrt(bundle).__version__, gpu_sim.SIM_GPU, envs)
    # the same images
    ort_b = _ort_image(setup.fresh_b, image)
    assert np.array_equal(_ort_image(bundle, image), ort_b)
    assert np.array_equal(_trt_image(bundle, image), _trt_image(setup.fresh_b, image))
    assert not np.array_equal(before, ort_b)  # A and B differ: the comparison can fail


def test_an_engine_whose_graph_was_refitted_without_it_does_not_run(setup: Setup, tmp_path: Path) -> None:
    from r2r.engines.tensorrt import EngineCompatError, check_engine_compat
    from r2r.export import graph_refit as onnx_refit

    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    manifest = read_manifest(bundle)
    target = onnx_refit.refit_target(bundle, manifest, setup.model_b, setup.model_b / "negative_embedding.safetensors")
    onnx_refit.refit_graphs(bundle, manifest, target, progress=lambda s: None)  # the graphs only
    manifest = read_manifest(bundle)
    with pytest.raises(EngineCompatError, match="built from another unet graph"):
        check_engine_compat(manifest, gpu_sim.fake_tensorrt(bundle).__version__, gpu_sim.SIM_GPU["name"],
                            gpu_sim.SIM_GPU["compute_capability"], bundle=bundle)
    # and the simulation, which runs an engine's graph file, refuses to: the engine holds other weights
    trt, _ = gpu_sim.sim_modules(bundle)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
        (bundle / manifest.engines["tensorrt/fp32/unet"].files[0]).read_bytes())
    assert engine.create_execution_context() is None and "holds other weights" in trt._fake_log[-1]


def test_an_interrupted_refit_is_refused_by_the_runtime_and_finished_by_a_second_run(setup: Setup, tmp_path: Path,
                                                                                    stripes_image) -> None:
    from r2r.runtime.bundle_reader import open_bundle

    bundle = _copy(setup.bundle_a, tmp_path / "bundle")

    def killed(self, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while TensorRT refits

    trt = gpu_sim.fake_tensorrt(bundle, overrides={"Refitter.refit_cuda_engine": killed})
    with pytest.raises(KeyboardInterrupt):
        _refit(bundle, setup, trt=trt)
    with pytest.raises(BundleError, match="did not finish"):
        open_bundle(bundle)
    report = _refit(bundle, setup)
    assert report.graphs == {}  # the graphs were refitted by the first run; the engine is refitted now
    assert report.tensorrt == [f"{graph_io.UNET} (fp32)"]
    assert read_manifest(bundle).engines["tensorrt/fp32/unet"].info["last_refit"]["weights_set"] > 0
    image = stripes_image(6)
    assert np.array_equal(_trt_image(bundle, image), _trt_image(setup.fresh_b, image))


def test_bundles_that_cannot_be_refitted_are_refused_before_anything_changes(setup: Setup, tmp_path: Path) -> None:
    from r2r.engines.tensorrt import TensorRTBuildError, TrtBuildConfig, build_bundle_engines
    from r2r.export.weight_map import RefitError

    fresh = _copy(setup.fresh_b, tmp_path / "no-maps")  # exported without --refit
    blob = (fresh / "manifest.json").read_bytes()
    with pytest.raises(RefitError, match="--refit"):
        _refit(fresh, setup)
    assert (fresh / "manifest.json").read_bytes() == blob
    fixed = _copy(setup.bundle_a, tmp_path / "fixed-engines")
    build_bundle_engines(fixed, TrtBuildConfig("fp16"), trt=gpu_sim.fake_tensorrt(fixed), gpu=gpu_sim.SIM_GPU,
                         progress=lambda s: None)  # engines built without --refit
    blob = (fixed / "manifest.json").read_bytes()
    with pytest.raises(TensorRTBuildError, match="without --refit"):
        _refit(fixed, setup)
    assert (fixed / "manifest.json").read_bytes() == blob


def test_the_refitter_takes_only_known_weights_of_the_same_size_and_supplies_missing_ones(setup: Setup,
                                                                                          tmp_path: Path) -> None:
    from r2r.engines.tensorrt import refit_engine

    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    m = read_manifest(bundle)
    plan = bundle / m.engines["tensorrt/fp32/vae_decoder"].files[0]
    trt = gpu_sim.fake_tensorrt(bundle)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan.read_bytes())
    refitter = trt.Refitter(engine, trt.Logger())
    name = refitter.get_all_weights()[0]
    assert not refitter.set_named_weights("no.such.weights", trt.Weights(np.zeros(4, np.float32)))
    assert not refitter.set_named_weights(name, trt.Weights(np.zeros(3, np.float32)))
    from r2r.export.weight_map import read_initializers

    value = read_initializers(bundle / m.graphs[graph_io.VAE_DECODER].file, [name])[name]
    assert not refitter.set_named_weights(name, trt.Weights(value.astype(np.float16).ravel()))  # another type
    assert refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value).ravel()))
    # TensorRT may ask for weights it combined with those set: they are supplied from the graph
    asked = {"Refitter.get_missing_weights": lambda self: [name]}
    info = refit_engine(plan, bundle / m.graphs[graph_io.VAE_DECODER].file, [],
                        trt=gpu_sim.fake_tensorrt(bundle, overrides=asked))
    assert info["weights_set"] == 0  # nothing asked, nothing set: the engine is left as it is
    other = refitter.get_all_weights()[1]
    info = refit_engine(plan, bundle / m.graphs[graph_io.VAE_DECODER].file, [other],
                        trt=gpu_sim.fake_tensorrt(bundle, overrides=asked))
    assert info == {**info, "weights_set": 2, "missing_supplied": 1}


def test_r2r_export_refit_command(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  stripes_image) -> None:
    from r2r.engines.bundle_refit import drop_engines
    from r2r.engines.cli import main

    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    monkeypatch.setenv("R2R_CACHE", str(setup.cache))  # the fused model of `--lora` is the one made already
    args = ["refit", "--bundle", str(bundle), "--lora", str(setup.lora_b)]
    blob = (bundle / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, args)  # TensorRT engines, and no TensorRT here
    assert res.exit_code == 1 and "only TensorRT can refit" in res.output
    assert (bundle / "manifest.json").read_bytes() == blob
    drop_engines(bundle, read_manifest(bundle), {"tensorrt"})
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "weights changed: unet" in res.output
    got, want = read_manifest(bundle), read_manifest(setup.fresh_b)
    assert {g: e.key for g, e in got.graphs.items()} == {g: e.key for g, e in want.graphs.items()}
    image = stripes_image(7)
    assert np.array_equal(_ort_image(bundle, image), _ort_image(setup.fresh_b, image))


def test_a_refitted_graph_is_checked_against_the_new_model_before_it_replaces_the_old(setup: Setup,
                                                                                    tmp_path: Path) -> None:
    from r2r.export import graph_refit as onnx_refit
    from r2r.export.bundle_writer import part_params
    from r2r.export.weight_map import RefitError, read_map, refit_graph
    from r2r.tac import install_tac

    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    manifest = read_manifest(bundle)
    target = onnx_refit.refit_target(bundle, manifest, setup.model_b, setup.model_b / "negative_embedding.safetensors")
    check = onnx_refit.parity_check(graph_io.UNET, target, install_tac(target.comps.unet, target.plan))
    check(setup.fresh_b / read_manifest(setup.fresh_b).graphs[graph_io.UNET].file)  # B's own graph passes
    with pytest.raises(RefitError, match="is not the new model's"):
        check(bundle / manifest.graphs[graph_io.UNET].file)  # A's does not: the check can fail
    # a map that puts a weight in the wrong place (as a folded parameter left stale would) is caught, and the graph
    # is left as it was
    entry = manifest.graphs[graph_io.UNET]
    mapping = read_map(bundle / entry.refit_map, graph_io.UNET, "unet")
    params = part_params(target.comps, "unet")
    q = sorted((params[n].shape, k) for k, [(n, _)] in mapping.items() if n.endswith("attn1.to_q.weight"))
    a, b = next((x[1], y[1]) for x, y in pairwise(q) if x[0] == y[0])  # two of one shape
    mapping[a], mapping[b] = mapping[b], mapping[a]
    blob = (bundle / entry.file).read_bytes()
    with pytest.raises(RefitError, match="is not the new model's"):
        refit_graph(bundle / entry.file, mapping, params, check=check)
    assert (bundle / entry.file).read_bytes() == blob


def test_a_text_encoder_change_computes_the_conditioning_again_and_leaves_the_graphs(setup: Setup, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.numpy import load_file

    from r2r.engines.bundle_refit import refit_bundle
    from r2r.lora import LoraSpec, fuse_loras
    from r2r.models import EMBEDDED_DEFAULT, encode_conditioning, load_components

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_DEFAULT, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(6)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"]),
                            pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "te", safe_serialization=True,
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    monkeypatch.setenv("R2R_CACHE", str(setup.cache))
    model = fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(setup.lora_a), LoraSpec(tmp_path / "te" /
                                                                          "pytorch_lora_weights.safetensors")],
                       progress=lambda s: None)  # bundle A's UNet, another text encoder
    bundle = _copy(setup.bundle_a, tmp_path / "bundle")
    before = read_manifest(bundle)
    report = refit_bundle(bundle, model, model / "negative_embedding.safetensors", trt=gpu_sim.fake_tensorrt(bundle),
                          gpu=gpu_sim.SIM_GPU, progress=lambda s: None)
    after = read_manifest(bundle)
    assert report.graphs == {} and report.tensorrt == [] and report.rebuilt == []  # the UNet and VAE are A's
    assert {g: e.key for g, e in after.graphs.items()} == {g: e.key for g, e in before.graphs.items()}
    assert after.cond["key"] != before.cond["key"]
    c_null, c_neg = encode_conditioning(load_components(model), model / "negative_embedding.safetensors")
    cond = load_file(str(bundle / after.cond["file"]))
    assert np.array_equal(cond[graph_io.COND_NULL], c_null.numpy()) and np.array_equal(cond[graph_io.COND_NEG],
                                                                                       c_neg.numpy())
    old = load_file(str(setup.bundle_a / before.cond["file"]))
    assert not np.array_equal(old[graph_io.COND_NEG],
                              cond[graph_io.COND_NEG])  # the text encoder did change: the check can fail
