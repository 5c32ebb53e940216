"""The TensorRT engine builder (engines/tensorrt.py) against a strict stand-in for the `tensorrt` module.

The stand-in is generated from the API extracted from the TensorRT wheels (tests/support/api/*.json): its classes
have exactly the real methods and properties, and every call is checked against the real overloads. The few
behaviours a build needs (parse an ONNX file into network inputs, build a plan, grow a timing cache) are the GPU
simulation's (tests/support/gpu_sim.py). No GPU and no TensorRT library is involved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import gpu_sim
from support.api import load_api
from support.gpu_sim import CACHE_MAGIC, PLAN_MAGIC, calls

from r2r import gpu, graph_io
from r2r.atomic import TEMP_GLOB
from r2r.engines import tensorrt as trtb
from r2r.manifest import GraphEntry, Manifest, TensorSpec, read_manifest, record_file, write_manifest

GPU = {"name": "NVIDIA L4", "compute_capability": "8.9", "total_memory_bytes": 23_000_000_000}
PRECISION_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"}


# ---- the fake ---------------------------------------------------------------------------------------------------

def fake_tensorrt(listing: str = "tensorrt", **overrides: Any) -> Any:
    """The GPU simulation's strict `tensorrt` (its builder behaviours), plans naming absolute ONNX paths."""
    return gpu_sim.fake_tensorrt(listing=listing, overrides=overrides)


# ---- a tiny bundle -----------------------------------------------------------------------------------------------

def tiny_unet(path: Path, k: int = 1, weight_type: int = TensorProto.FLOAT, qdq: str | None = None,
              custom_op: bool = False, spatial: bool = False) -> list[TensorSpec]:
    """eps = sample * timestep * w + mean(ehs) with the contract's names; batch dim k*B; with `spatial`, the
    latent's sides free as in a dynamic-size bundle of pixel multiple 64 (8*hm, 8*wm); returns input specs."""
    b = "B" if k == 1 else f"{k}*B"
    lat: list[int | str] = [b, 4, "8*hm", "8*wm"] if spatial else [b, 4, 8, 8]
    np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[weight_type]
    inputs = [helper.make_tensor_value_info(graph_io.SAMPLE, TensorProto.FLOAT, lat),
              helper.make_tensor_value_info(graph_io.TIMESTEP, TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info(graph_io.ENCODER_HIDDEN_STATES, TensorProto.FLOAT, [b, 77, 16])]
    output = helper.make_tensor_value_info(graph_io.EPS, TensorProto.FLOAT, lat)
    inits = [numpy_helper.from_array(np.full([1], 0.5, np_type), "w"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "bshape")]
    nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT)]
    scaled = "sample"
    if qdq:
        zp_type = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}[qdq]
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "qs"),
                  helper.make_tensor("qz", zp_type, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["sample", "qs", "qz"], ["sq"]),
                  helper.make_node("DequantizeLinear", ["sq", "qs", "qz"], ["sdq"])]
        scaled = "sdq"
    nodes += [helper.make_node("Mul", [scaled, graph_io.TIMESTEP], ["st"]),
              helper.make_node("Mul", ["st", "w32"], ["stw"]),
              helper.make_node("ReduceMean", [graph_io.ENCODER_HIDDEN_STATES, "axes"], ["m"], keepdims=0),
              helper.make_node("Reshape", ["m", "bshape"], ["m4"]),
              helper.make_node("Add", ["stw", "m4"], [graph_io.EPS])]
    opsets = [helper.make_opsetid("", 19)]
    if custom_op:
        nodes.append(helper.make_node("Mystery", [graph_io.EPS], ["unused"], domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, [output], inits), opset_imports=opsets)
    model.ir_version = 9
    if not custom_op:
        onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return [TensorSpec(graph_io.SAMPLE, lat, "float32"), TensorSpec(graph_io.TIMESTEP, [1], "float32"),
            TensorSpec(graph_io.ENCODER_HIDDEN_STATES, [b, 77, 16], "float32")]


def make_bundle(root: Path, graphs: dict[str, int] | None = None, **graph_kw: Any) -> Path:
    """A bundle with tiny UNet graphs: name -> batch multiple k of their inputs (here unet B, unet_inject 2*B,
    unet_emit 3*B: the contract's names, the test's own shapes)."""
    graphs = graphs or {graph_io.UNET: 1, graph_io.UNET_INJECT: 2, graph_io.UNET_EMIT: 3}
    manifest = Manifest(source={"model": "tiny"}, width=512, height=512, batch_min=1, batch_max=4,
                        latent={"channels": 4, "height": 8, "width": 8}, scaling_factor=0.18215,
                        tac_plan={}, schedule={},
                        sizes={"multiple": 64, "min": [128, 128], "opt": [512, 512], "max": [1024, 768]})
    for name, k in graphs.items():
        rel = f"onnx/{name}/{name}.onnx"
        inputs = tiny_unet(root / rel, k, **graph_kw)
        record_file(root, manifest, rel)
        manifest.graphs[name] = GraphEntry(rel, inputs, [TensorSpec(graph_io.EPS, inputs[0].shape, "float32")],
                                           key=f"key-{name}")
    write_manifest(root, manifest)
    return root


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


def build(bundle: Path, trt: Any, precision: str = "fp16", gpu: dict[str, Any] = GPU, **cfg: Any) -> tuple[list, list]:
    lines: list[str] = []
    entries = trtb.build_bundle_engines(bundle, trtb.TrtBuildConfig(precision=precision, **cfg), trt=trt, gpu=gpu,
                                        progress=lines.append)
    return entries, lines


# ---- tests -------------------------------------------------------------------------------------------------------

def test_builder_calls_only_real_api_with_valid_arguments(bundle: Path) -> None:
    trt = fake_tensorrt()
    entries, lines = build(bundle, trt, "fp16", workspace_bytes=1 << 30, refit=True, builder_optimization_level=5)
    assert [e.graph for e in entries] == [graph_io.UNET, graph_io.UNET_EMIT, graph_io.UNET_INJECT]  # contract order
    api = load_api("tensorrt")["classes"]
    for call in trt._fake_calls:  # every call went through a real class's real method or property
        cls, _, member = call.name.partition(".")
        member = member.rstrip("=")
        assert member in api[cls]["methods"] or member in api[cls]["properties"] or member == "__init__", call
    names = [c.name for c in trt._fake_calls]
    for expected in ("Logger.__init__", "Builder.__init__", "Builder.create_network", "OnnxParser.__init__",
                     "OnnxParser.parse_from_file", "Builder.create_builder_config", "IBuilderConfig.set_flag",
                     "IBuilderConfig.builder_optimization_level=", "IBuilderConfig.set_memory_pool_limit",
                     "Builder.create_optimization_profile", "IOptimizationProfile.set_shape",
                     "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
                     "IBuilderConfig.set_timing_cache", "Builder.build_serialized_network",
                     "ITimingCache.serialize"):
        assert expected in names, expected
    assert all(isinstance(a["model"], str) for a in calls(trt, "OnnxParser.parse_from_file"))
    assert calls(trt, "IBuilderConfig.builder_optimization_level=")[0] == {"value": 5}
    plan = trt._fake_builds[0]
    assert plan["pools"] == {"WORKSPACE": 1 << 30}
    assert set(plan["builder_flags"]) == {"FP16", "REFIT"}
    assert not trt._fake_log
    for e in entries:
        path = bundle / e.files[0]
        assert path.read_bytes().startswith(PLAN_MAGIC)
        assert e.files == [f"engines/tensorrt/fp16/{e.graph}.plan"]
        assert e.backend == "tensorrt" and e.info["tensorrt_version"] == "10.16.1.11"
        assert e.info["gpu_name"] == GPU["name"] and e.info["compute_capability"] == "8.9"
    assert not list(bundle.rglob(TEMP_GLOB))
    manifest = read_manifest(bundle)
    assert set(manifest.engines) == {f"tensorrt/fp16/{g}" for g in (graph_io.UNET, graph_io.UNET_INJECT,
                                                                    graph_io.UNET_EMIT)}
    assert "engines/tensorrt/timing.cache" in manifest.files
    assert len(lines) == 3 and all(" built in " in line and " MB" in line for line in lines)


def test_profile_spans_batch_range_with_multiples(bundle: Path) -> None:
    trt = fake_tensorrt()
    entries, _ = build(bundle, trt, "fp16", batch_opt=2)
    by_graph = {e.graph: e.info["profile"] for e in entries}
    # the routed UNet also runs the guided batch and the fused step, with a prompt's text rows [cg, neg, null, text],
    # so its B reaches 4 * batch_max (CALL_MULTIPLES)
    for graph, k, top in ((graph_io.UNET, 1, 16), (graph_io.UNET_INJECT, 2, 4), (graph_io.UNET_EMIT, 3, 4)):
        prof = by_graph[graph]
        assert prof[graph_io.SAMPLE] == {"min": [k, 4, 8, 8], "opt": [2 * k, 4, 8, 8], "max": [top * k, 4, 8, 8]}
        assert prof[graph_io.ENCODER_HIDDEN_STATES] == {"min": [k, 77, 16], "opt": [2 * k, 77, 16],
                                                  "max": [top * k, 77, 16]}
        assert prof[graph_io.TIMESTEP] == {"min": [1], "opt": [1], "max": [1]}
    set_shapes = calls(trt, "IOptimizationProfile.set_shape")
    assert len(set_shapes) == 9
    third = [a for a in set_shapes if a["input"] == graph_io.SAMPLE][1]  # unet_emit, built second, with 3*B inputs here
    assert (list(third["min"]), list(third["opt"]), list(third["max"])) == ([3, 4, 8, 8], [6, 4, 8, 8], [12, 4, 8, 8])
    assert len(calls(trt, "IBuilderConfig.add_optimization_profile")) == 3  # one profile per engine


def test_a_dynamic_size_graph_gets_one_profile_over_the_bundles_size_range_or_its_example_size(
        tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle", {graph_io.UNET: 1}, spatial=True)
    (entry,), _ = build(root, fake_tensorrt(), "fp16", batch_opt=1)
    # sizes 128x128 .. 1024x768 in multiples of 64, tuned for the example size 512x512 (latent 64x64)
    assert entry.info["profile"][graph_io.SAMPLE] == {"min": [1, 4, 16, 16], "opt": [1, 4, 64, 64],
                                                "max": [16, 4, 96, 128]}
    assert entry.info["sizes"] == {"min": [2, 2], "opt": [8, 8], "max": [16, 12]}  # [W, H] in multiples
    trt = fake_tensorrt()
    (static,), lines = build(root, trt, "fp16", batch_opt=1, sizes="opt")
    assert "built in" in lines[0] and static.key != entry.key  # another profile: another engine
    assert static.info["profile"][graph_io.SAMPLE] == {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64],
                                                 "max": [16, 4, 64, 64]}
    with pytest.raises(ValueError, match="sizes"):
        trtb.TrtBuildConfig("fp16", sizes="any")


def test_batch_opt_defaults_to_batch_max(bundle: Path) -> None:
    entries, _ = build(bundle, fake_tensorrt(), "fp16", batch_opt=None)
    by_graph = {e.graph: e.info["batch"] for e in entries}
    # B, the guided batch's 2B (3B with a prompt's text row), the fused step's 3B (4B)
    assert by_graph[graph_io.UNET] == {"min": 1, "opt": 4, "max": 16}
    assert by_graph[graph_io.UNET_EMIT] == {"min": 1, "opt": 4, "max": 4}
    with pytest.raises(ValueError, match="outside the bundle's batch range"):
        build(bundle, fake_tensorrt(), "bf16", batch_opt=5)


@pytest.mark.parametrize(("precision", "flag"), [("fp32", None), ("fp16", "FP16"), ("bf16", "BF16")])
def test_precision_flags(bundle: Path, precision: str, flag: str | None) -> None:
    trt = fake_tensorrt()
    build(bundle, trt, precision)
    set_flags = {a["flag"].name for a in calls(trt, "IBuilderConfig.set_flag")}
    networks = [a.get("flags", 0) for a in calls(trt, "Builder.create_network")]
    strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if flag is None:
        assert set_flags.isdisjoint(PRECISION_FLAGS)
        assert networks == [strongly] * 3  # fp32: the graph's types, kept exactly
    else:
        assert set_flags == {flag}
        assert networks == [0] * 3  # weak typing: the builder may pick fp16/bf16 kernels
    assert not trt._fake_log


def test_timing_cache_created_then_reused(bundle: Path) -> None:
    trt = fake_tensorrt()
    entries, _ = build(bundle, trt, "fp16")
    cache_file = bundle / trtb.TIMING_CACHE
    assert cache_file.is_file()
    first_blob = cache_file.read_bytes()
    assert calls(trt, "IBuilderConfig.create_timing_cache")[0]["serialized_timing_cache"] == b""
    assert entries[0].info["timing_cache"]["loaded"] is False
    assert entries[-1].info["timing_cache"]["loaded"] is True  # later graphs of the same run load it

    # Another precision: a new engine, built with the cache the first run wrote.
    trt2 = fake_tensorrt()
    entries2, _ = build(bundle, trt2, "bf16")
    loaded = calls(trt2, "IBuilderConfig.create_timing_cache")[0]["serialized_timing_cache"]
    assert bytes(loaded) == first_blob
    assert entries2[0].info["timing_cache"]["loaded_entries"] > 0
    assert entries2[0].info["timing_cache"]["hit"] is False  # bf16 tactics were not timed yet
    assert len(json.loads(cache_file.read_bytes()[len(CACHE_MAGIC):])) > len(json.loads(first_blob[len(CACHE_MAGIC):]))

    # The same engine again (its plan lost): every tactic comes from the cache.
    (bundle / entries[0].files[0]).unlink()
    trt3 = fake_tensorrt()
    entries3, lines = build(bundle, trt3, "fp16")
    assert len(trt3._fake_builds) == 1
    assert entries3[0].info["timing_cache"]["hit"] is True
    assert "timing cache hit" in lines[0]


def test_unchanged_bundle_rebuilds_nothing(bundle: Path) -> None:
    build(bundle, fake_tensorrt(), "fp16")
    before = read_manifest(bundle)
    trt = fake_tensorrt()
    entries, lines = build(bundle, trt, "fp16")
    assert not calls(trt, "Builder.build_serialized_network")
    assert all("up to date" in line for line in lines) and len(lines) == 3
    assert read_manifest(bundle).engines == before.engines
    assert [e.key for e in entries] == [before.engines[f"tensorrt/fp16/{g}"].key
                                        for g in (graph_io.UNET, graph_io.UNET_EMIT, graph_io.UNET_INJECT)]


@pytest.mark.parametrize("change", ["precision", "gpu", "tensorrt", "opt_level", "graph", "tampered"])
def test_changes_rebuild(bundle: Path, change: str) -> None:
    build(bundle, fake_tensorrt(), "fp16")
    first = read_manifest(bundle).engines
    trt, precision, gpu, cfg = fake_tensorrt(), "fp16", dict(GPU), {}
    if change == "precision":
        precision = "bf16"
    elif change == "gpu":
        gpu["name"] = "NVIDIA H100 80GB HBM3"
    elif change == "tensorrt":
        trt.__version__ = "10.16.2.1"
    elif change == "opt_level":
        cfg["builder_optimization_level"] = 4
    elif change == "graph":
        m = read_manifest(bundle)
        m.graphs[graph_io.UNET].key = "key-unet-retrained"
        write_manifest(bundle, m)
    elif change == "tampered":
        (bundle / first["tensorrt/fp16/unet"].files[0]).write_bytes(b"not a plan")
    build(bundle, trt, precision, gpu=gpu, **cfg)
    rebuilt = len(calls(trt, "Builder.build_serialized_network"))
    assert rebuilt == (1 if change in ("graph", "tampered") else 3)
    after = read_manifest(bundle).engines
    if change == "precision":
        assert set(after) == set(first) | {f"tensorrt/bf16/{g}" for g in (graph_io.UNET, graph_io.UNET_INJECT,
                                                                          graph_io.UNET_EMIT)}
    else:
        assert after["tensorrt/fp16/unet"].key != first["tensorrt/fp16/unet"].key or change == "tampered"
    if change == "gpu":
        assert after["tensorrt/fp16/unet"].info["gpu_name"] == "NVIDIA H100 80GB HBM3"


def test_without_tensorrt_the_error_names_the_extra(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(gpu.TensorRTNotInstalled) as err:
        gpu.import_tensorrt()
    assert str(err.value) == "TensorRT is not installed: pip install 'r2r[gpu]' on a machine with an NVIDIA GPU"
    with pytest.raises(gpu.TensorRTNotInstalled, match=r"r2r\[gpu\]"):
        trtb.build_bundle_engines(bundle, trtb.TrtBuildConfig(), gpu=GPU)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(gpu.TensorRTNotInstalled, match=r"cuda-python is not installed: pip install 'r2r\[gpu\]'"):
        gpu.gpu_info()


def test_check_engine_compat(bundle: Path) -> None:
    build(bundle, fake_tensorrt(), "fp16")
    m = read_manifest(bundle)
    ok = trtb.check_engine_compat(m, "10.16.1.11", GPU["name"], (8, 9))
    assert len(ok) == 3
    rebuild = f"r2r-export build-engines --backend tensorrt --precision fp16 --out {bundle}"
    with pytest.raises(trtb.EngineCompatError, match=r"TensorRT 10\.16\.1\.11") as err:
        trtb.check_engine_compat(m, "10.17.0.1", GPU["name"], "8.9", bundle=bundle)
    assert rebuild in str(err.value)
    with pytest.raises(trtb.EngineCompatError, match="NVIDIA A100") as err:
        trtb.check_engine_compat(m, "10.16.1.11", "NVIDIA A100-SXM4-80GB", "8.0", bundle=bundle)
    assert rebuild in str(err.value)
    assert isinstance(err.value, ValueError)  # a BundleError, like the manifest's other refusals
    with pytest.raises(trtb.EngineCompatError, match="--precision bf16"):
        trtb.check_engine_compat(m, "10.16.1.11", GPU["name"], "8.9", precision="bf16")


def test_fake_is_strict() -> None:
    trt = fake_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    with pytest.raises(AttributeError):
        builder.build_engine(network, config)  # TensorRT 8's, removed in 10
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30  # likewise: set_memory_pool_limit replaced it
    with pytest.raises(AttributeError):
        getattr(trt.Builder, "max_batch_size")  # noqa: B009 - the point is the AttributeError
    with pytest.raises(AttributeError):
        builder.platform_has_fast_fp16 = True  # read-only
    with pytest.raises(TypeError):
        builder.create_network(flags=0, explicit_batch=True)
    with pytest.raises(TypeError):
        trt.OnnxParser(network, logger).parse_from_file(Path("model.onnx"))  # a str, not a Path
    with pytest.raises(TypeError):
        config.set_timing_cache(config.create_timing_cache(b""))  # ignore_mismatch has no default
    with pytest.raises(TypeError):
        config.set_flag("FP16")
    with pytest.raises(TypeError):
        trt.IHostMemory()  # no Python constructor
    assert not hasattr(fake_tensorrt("tensorrt11").NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(fake_tensorrt("tensorrt11").BuilderFlag, "FP16")


def test_tensorrt11_builds_fp32_and_refuses_weak_fp16(bundle: Path) -> None:
    trt = fake_tensorrt("tensorrt11")
    entries, _ = build(bundle, trt, "fp32")
    assert entries[0].info["tensorrt_version"].startswith("11.")
    assert entries[0].info["strongly_typed"] is True
    with pytest.raises(trtb.TensorRTBuildError, match="removed in TensorRT 11"):
        build(bundle, fake_tensorrt("tensorrt11"), "fp16")


def test_graph_already_fp16_is_built_strongly_typed(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", {graph_io.UNET: 1}, weight_type=TensorProto.FLOAT16)
    for listing in ("tensorrt", "tensorrt11"):
        trt = fake_tensorrt(listing)
        entries, _ = build(bundle, trt, "fp16")
        assert entries[0].info["strongly_typed"] is True and not calls(trt, "IBuilderConfig.set_flag")
    with pytest.raises(trtb.TensorRTBuildError, match="weights are float16"):
        build(bundle, fake_tensorrt(), "bf16")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_int8_fp8_need_qdq_and_use_strong_typing(tmp_path: Path, precision: str) -> None:
    plain = make_bundle(tmp_path / "plain", {graph_io.UNET: 1})
    with pytest.raises(trtb.TensorRTBuildError, match="QuantizeLinear/DequantizeLinear"):
        build(plain, fake_tensorrt(), precision)
    quant = make_bundle(tmp_path / "quant", {graph_io.UNET: 1}, qdq=precision)
    trt = fake_tensorrt()
    entries, _ = build(quant, trt, precision)
    assert entries[0].info["strongly_typed"] is True
    assert {a["flag"].name for a in calls(trt, "IBuilderConfig.set_flag")}.isdisjoint(PRECISION_FLAGS)
    assert not trt._fake_log
    other = "fp8" if precision == "int8" else "int8"
    with pytest.raises(trtb.TensorRTBuildError, match=f"quantized to {other}"):
        build(quant, fake_tensorrt(), other)


def test_parser_errors_are_reported(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", {graph_io.UNET: 1}, custom_op=True)
    with pytest.raises(trtb.TensorRTBuildError, match=r"ONNX parser failed: UNSUPPORTED_NODE.*Mystery"):
        build(bundle, fake_tensorrt(), "fp16")


def test_unreadable_graph_is_refused(bundle: Path) -> None:
    m = read_manifest(bundle)
    (bundle / m.graphs[graph_io.UNET].file).write_bytes(b"\x00garbage")
    record_file(bundle, m, m.graphs[graph_io.UNET].file)
    write_manifest(bundle, m)
    with pytest.raises(trtb.TensorRTBuildError, match="not a readable ONNX graph"):
        build(bundle, fake_tensorrt(), "fp16")


def test_failed_build_raises_and_writes_nothing(bundle: Path) -> None:
    trt = fake_tensorrt(**{"Builder.build_serialized_network": lambda self, network, config, kernel_text=None: None})
    with pytest.raises(trtb.TensorRTBuildError, match="could not build a fp16 engine"):
        build(bundle, trt, "fp16")
    assert not (bundle / "engines/tensorrt/fp16").exists() or not list((bundle / "engines/tensorrt/fp16").iterdir())
    assert read_manifest(bundle).engines == {}


def test_parser_kept_alive_until_the_build(bundle: Path) -> None:
    build(bundle, trt := fake_tensorrt(), "fp16")
    assert not trt._fake_log  # the fake refuses a build whose parser (owner of the weights) is gone


def test_graph_selection_and_unknown_graph(bundle: Path) -> None:
    trt = fake_tensorrt()
    entries = trtb.build_bundle_engines(bundle, trtb.TrtBuildConfig("fp16"), graphs=[graph_io.UNET_EMIT], trt=trt,
                                        gpu=GPU, progress=lambda _: None)
    assert [e.graph for e in entries] == [graph_io.UNET_EMIT]
    with pytest.raises(ValueError, match="no graph vae_decoder"):
        trtb.build_bundle_engines(bundle, trtb.TrtBuildConfig("fp16"), graphs=[graph_io.VAE_DECODER], trt=trt, gpu=GPU)


def test_graph_inputs_must_match_manifest(bundle: Path) -> None:
    m = read_manifest(bundle)
    m.graphs[graph_io.UNET].inputs[1] = TensorSpec("t", [1], "float32")
    write_manifest(bundle, m)
    with pytest.raises(trtb.TensorRTBuildError, match="differ from the manifest"):
        build(bundle, fake_tensorrt(), "fp16")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="precision"):
        trtb.TrtBuildConfig("int4")
    with pytest.raises(ValueError, match="0 to 5"):
        trtb.TrtBuildConfig("fp16", builder_optimization_level=6)
    with pytest.raises(ValueError, match="inside the bundle"):
        trtb.TrtBuildConfig("fp16", timing_cache="../timing.cache")
    assert graph_io.batch_multiple("3*B") == 3 and graph_io.batch_multiple("B") == 1
    assert graph_io.batch_multiple(77) is None
    with pytest.raises(ValueError):
        graph_io.batch_multiple("H")


def test_gpu_info_reads_device_properties() -> None:
    spec = load_api("cudart")["functions"]["cudaGetDeviceProperties"]
    assert spec["args"] == ["device"] and spec["returns"][0] == "cudaError_t"
    ok = SimpleNamespace(cudaSuccess="ok")
    prop = SimpleNamespace(name=b"NVIDIA L4\x00\x00", major=8, minor=9, totalGlobalMem=23_000_000_000)
    rt = SimpleNamespace(cudaError_t=ok, cudaGetDeviceProperties=lambda device: ("ok", prop))
    assert gpu.gpu_info(0, cudart=rt) == {"name": "NVIDIA L4", "compute_capability": "8.9",
                                           "total_memory_bytes": 23_000_000_000, "device": 0}
    bad = SimpleNamespace(cudaError_t=ok, cudaGetDeviceProperties=lambda device: ("cudaErrorNoDevice", None))
    with pytest.raises(gpu.GpuUnavailable, match="not usable"):
        gpu.gpu_info(0, cudart=bad)


def test_gpu_info_with_real_cuda_python_and_no_gpu() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime")
    if runtime.cudaGetDeviceCount()[0] == runtime.cudaError_t.cudaSuccess:
        pytest.skip("a CUDA device is present")
    with pytest.raises(gpu.GpuUnavailable, match=r"cudaErrorInsufficientDriver|cudaErrorNoDevice"):
        gpu.gpu_info()


def test_api_listings_hold_what_the_builder_uses() -> None:
    trt10, trt11, cudart = load_api("tensorrt"), load_api("tensorrt11"), load_api("cudart")
    assert trt10["tensorrt_version"].startswith("10.") and trt11["tensorrt_version"].startswith("11.")
    for member in ("FP16", "BF16", "INT8", "FP8", "REFIT"):
        assert member in trt10["enums"]["BuilderFlag"]
    assert {"STRONGLY_TYPED", "EXPLICIT_BATCH"} <= set(trt10["enums"]["NetworkDefinitionCreationFlag"])
    for api in (trt10, trt11):
        assert "WORKSPACE" in api["enums"]["MemoryPoolType"]
        assert {"INPUT", "OUTPUT"} <= set(api["enums"]["TensorIOMode"])
        assert "DETAILED" in api["enums"]["ProfilingVerbosity"]
        assert api["classes"]["Builder"]["methods"]["build_serialized_network"][0] == ["network", "config"]
        assert "build_engine" not in api["classes"]["Builder"]["methods"]
        assert api["counts"]["classes"] == len(api["classes"])
    for name in ("cudaStreamCreate", "cudaMallocAsync", "cudaMemcpyAsync", "cudaStreamBeginCapture",
                 "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaStreamSynchronize",
                 "cudaGetDeviceProperties", "cudaEventCreate", "cudaEventRecord", "cudaEventElapsedTime"):
        assert cudart["functions"][name]["returns"][0] == "cudaError_t", name
    assert cudart["functions"]["cudaGraphInstantiate"]["args"] == ["graph", "flags"]


def test_extractor_reads_elf_imports() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "extract_trt_api.py"
    spec = importlib.util.spec_from_file_location("r2r_extract_api", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import _ctypes

    if not str(_ctypes.__file__).endswith(".so"):
        pytest.skip("_ctypes is built into this interpreter")
    needed, undefined = mod.elf_imports(Path(_ctypes.__file__))
    assert any(n.startswith("libffi") for n in needed) or needed == []
    assert any(s.startswith("Py") for s in undefined)


def test_damaged_timing_cache_starts_afresh(bundle: Path) -> None:
    cache_file = bundle / trtb.TIMING_CACHE
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"half a cache")
    trt = fake_tensorrt()
    entries, lines = build(bundle, trt, "fp16")
    assert "does not fit" in lines[0]
    assert entries[0].info["timing_cache"]["loaded"] is False
    assert cache_file.read_bytes().startswith(CACHE_MAGIC)
