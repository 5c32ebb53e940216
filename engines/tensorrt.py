"""TensorRT engines from a bundle's ONNX graphs: one plan per graph and precision, built, checked and refitted.

Builders take the `tensorrt` module as `trt=` (tests pass a strict stand-in); plans and the timing cache are written
atomically and recorded in the manifest. fp32 and graphs already in their precision build strongly typed, fp16/bf16
from an fp32 graph only on TensorRT 10; int8/fp8 only from Q/DQ graphs of that type; engines built for another
TensorRT, GPU or graph version are refused. Why: docs/design.md, "The GPU path".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from r2r import graph_io
from r2r.atomic import atomic_write
from r2r.backends import BuildRequest, backend_row
from r2r.errors import R2RError
from r2r.export.canary import record_graph_canaries
from r2r.gpu import gpu_info, import_tensorrt
from r2r.locks import writes_bundle
from r2r.log import log
from r2r.manifest import (
    ENGINES_DIR,
    BundleError,
    EngineEntry,
    Manifest,
    TensorSpec,
    bundle_path,
    read_manifest,
    record_file,
    verify_files,
    write_manifest,
)

BACKEND = "tensorrt"
ROW = backend_row(BACKEND)
PRECISIONS = ROW.precisions
TIMING_CACHE = f"{ENGINES_DIR}/{BACKEND}/timing.cache"

_FLOAT_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TensorRTBuildError(R2RError, RuntimeError):
    """An engine could not be built; the message says why and what to do."""


class EngineCompatError(BundleError):
    """The bundle's engines were built for another TensorRT or GPU; the message names the rebuild command."""


@dataclass(frozen=True)
class TrtBuildConfig:
    precision: str = "fp16"
    builder_optimization_level: int = 3  # 0-5; TensorRT's default is 3
    workspace_bytes: int | None = None  # MemoryPoolType.WORKSPACE limit; None leaves TensorRT's (device memory)
    refit: bool = False  # BuilderFlag.REFIT: weights can be swapped later without a rebuild
    batch_opt: int | None = None  # the batch the kernels are tuned for; None: the bundle's batch_max
    # The profile's sizes: the bundle's whole range ("range"), or its example size only ("opt": a static-size engine,
    # faster, that refuses every other size; docs/design.md, "Sizes")
    sizes: str = "range"
    timing_cache: str = TIMING_CACHE  # bundle-relative

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level {self.builder_optimization_level}: 0 to 5")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes {self.workspace_bytes}: positive, or None for TensorRT's default")
        if self.batch_opt is not None and self.batch_opt < 1:
            raise ValueError(f"batch_opt {self.batch_opt}: at least 1")
        if self.sizes not in ("range", "opt"):
            raise ValueError(f"sizes {self.sizes!r}: 'range' (the bundle's) or 'opt' (its example size only)")
        if Path(self.timing_cache).is_absolute() or ".." in Path(self.timing_cache).parts:
            raise ValueError(f"timing_cache {self.timing_cache}: a path inside the bundle")


# ---- shapes and graph inspection ------------------------------------------------------------------------------

def profile_envs(manifest: Manifest, graph: str, batch_opt: int, sizes: str = "range"
                 ) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """The symbols' values (B, hm, wm) at a graph's profile min / opt / max: the bundle's image batches at every
    multiple the program binds the graph's B at (`graph_io.CALL_MULTIPLES`: the routed UNet also runs the guided pair
    and the fused step), tuned for its most frequent call; the bundle's size range ("opt": its example size only),
    tuned for the example size."""
    mults = graph_io.CALL_MULTIPLES.get(graph, (1,))
    m, rng = manifest.sizes["multiple"], manifest.sizes
    batches = (manifest.batch_min * min(mults), batch_opt * mults[0], manifest.batch_max * max(mults))
    sides = (rng["min"], rng["opt"], rng["max"]) if sizes == "range" else (rng["opt"],) * 3
    mn, opt, mx = ({graph_io.BATCH: b, graph_io.HM: side[1] // m, graph_io.WM: side[0] // m}
                   for b, side in zip(batches, sides, strict=True))
    return mn, opt, mx


def profile_shapes(spec: TensorSpec, envs: Sequence[dict[str, int]]) -> tuple[list[int], ...]:
    """min / opt / max shapes of one input: its symbolic dimensions at each environment, fixed ones as they are."""
    return tuple(list(graph_io.concrete_shape(spec.shape, env)) for env in envs)


@dataclass(frozen=True)
class OnnxTypes:
    float_type: str  # the type most float initializers have: float32 / float16 / bfloat16 ("" if none)
    quantized: frozenset[str]  # "int8", "fp8", "int4", "fp4" from Q/DQ nodes


def inspect_onnx(path: str | Path) -> OnnxTypes:
    """Weight precision and Q/DQ types of a graph (its external data is not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise TensorRTBuildError(f"{path}: not a readable ONNX graph ({exc}); re-export the bundle with "
                                 "`r2r-export onnx`") from exc
    tp = onnx.TensorProto
    names = {tp.FLOAT: "float32", tp.FLOAT16: "float16", tp.BFLOAT16: "bfloat16", tp.DOUBLE: "float32"}
    inits = {t.name: t for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_type in names:
            counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + 1
    qtypes = {tp.INT8: "int8", tp.UINT8: "int8", tp.FLOAT8E4M3FN: "fp8", tp.INT4: "int4"}
    if hasattr(tp, "FLOAT4E2M1"):
        qtypes[tp.FLOAT4E2M1] = "fp4"
    quantized: set[str] = set()
    for node in model.graph.node:
        if node.op_type.startswith("TRT_FP8"):  # ModelOpt's TensorRT-specific FP8 Q/DQ
            quantized.add("fp8")
        elif node.op_type.startswith("TRT_INT4"):
            quantized.add("int4")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            attrs = {a.name: a.i for a in node.attribute}
            dtype = zero.data_type if zero is not None else attrs.get("output_dtype", tp.UINT8)
            quantized.add(qtypes.get(dtype, "int8") if dtype else "int8")
    float_type = max(counts, key=lambda k: counts[k]) if counts else ""
    return OnnxTypes(float_type, frozenset(quantized))


def network_plan(trt: ModuleType, precision: str, types: OnnxTypes, onnx_path: str | Path
                 ) -> tuple[bool, list[str]]:
    """(strongly typed?, BuilderFlag names to set) for a precision (docs/design.md, "The GPU path")."""
    if precision in ("int8", "fp8"):
        if precision not in types.quantized:
            found = ", ".join(sorted(types.quantized)) or "no Q/DQ nodes"
            raise TensorRTBuildError(
                f"{onnx_path}: --precision {precision} needs a graph quantized to {precision} with "
                f"QuantizeLinear/DequantizeLinear nodes (e.g. from TensorRT Model Optimizer); this one has {found}. "
                "Build fp16 or bf16 instead, or export a quantized graph")
        return True, []
    want = _FLOAT_TYPES[precision]
    have = types.float_type or "float32"
    if have == want:
        return True, []  # the graph already carries the precision: strong typing keeps it exactly
    if have != "float32":
        raise TensorRTBuildError(f"{onnx_path}: the graph's weights are {have}; it cannot be built as {precision}")
    if precision == "fp32":
        return True, []
    flag = precision.upper()
    if not hasattr(trt.BuilderFlag, flag):
        raise TensorRTBuildError(
            f"TensorRT {trt.__version__} builds only strongly typed networks (weak typing and BuilderFlag.{flag} "
            f"were removed in TensorRT 11), and {onnx_path} is fp32: convert it to {precision} first (ModelOpt "
            f"AutoCast), build with --precision fp32, or use TensorRT 10")
    return False, [flag]


# ---- one engine -----------------------------------------------------------------------------------------------

def _parse_onnx(trt: ModuleType, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    return parser


def _check_inputs(network: Any, inputs: Sequence[TensorSpec], onnx_path: Path) -> None:
    got = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tensor.shape
        got[tensor.name] = [shape[j] for j in range(len(shape))]
    if set(got) != {s.name for s in inputs}:
        raise TensorRTBuildError(f"{onnx_path}: network inputs {sorted(got)} differ from the manifest's "
                                 f"{sorted(s.name for s in inputs)}; re-export the bundle with `r2r-export onnx`")
    for spec in inputs:
        dims = got[spec.name]
        fixed_ok = len(dims) == len(spec.shape) and all(
            d == -1 or isinstance(s, str) or d == s for d, s in zip(dims, spec.shape, strict=True))
        if not fixed_ok:
            raise TensorRTBuildError(f"{onnx_path}: input {spec.name} is {dims} in the graph but {spec.shape} in the "
                                     "manifest; re-export the bundle with `r2r-export onnx`")


def _load_timing_cache(config: Any, path: Path | None, progress: Callable[[str], None]) -> tuple[Any, int, bool]:
    """Attach the bundle's timing cache (or a fresh one); returns (cache, entries loaded, loaded from file?)."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        # ignore_mismatch=False: a cache from another GPU is refused rather than trusted
        attached = cache is not None and config.set_timing_cache(cache, False)
    except (RuntimeError, ValueError, TypeError):  # a damaged file
        attached = False
    if not attached:
        if blob:
            progress(f"  timing cache {path} does not fit this TensorRT/GPU; starting a new one")
        blob = b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    return cache, len(cache.queryKeys()), bool(blob)


def build_engine(onnx_path: str | Path, engine_path: str | Path, inputs: Sequence[TensorSpec],
                 envs: Sequence[Mapping[str, int]], cfg: TrtBuildConfig, trt: ModuleType | None = None, *,
                 timing_cache: str | Path | None = None, gpu: dict[str, Any] | None = None,
                 progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Build one serialized engine (plan) from an ONNX graph; returns the facts the manifest records.

    `inputs` are the graph's input specs (TensorSpec shapes over the symbols B, hm, wm: "2*B", "4*hm"); the single
    optimization profile spans `envs` = (min, opt, max) values of those symbols, tuned for opt. `timing_cache` is a
    file to load and grow (None: an in-memory cache). `gpu` is `gpu_info()`'s answer (asked when None).
    """
    t = trt or import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    mn_env, opt_env, mx_env = envs
    for sym in mn_env:
        if not 1 <= mn_env[sym] <= opt_env[sym] <= mx_env[sym]:
            raise ValueError(f"{sym}: min {mn_env[sym]} <= opt {opt_env[sym]} <= max {mx_env[sym]} does not hold")
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"{onnx_path}: missing; re-export the bundle with `r2r-export onnx`")
    gpu = gpu if gpu is not None else gpu_info()
    strongly_typed, flags = network_plan(t, cfg.precision, inspect_onnx(onnx_path), onnx_path)

    logger = t.Logger(t.Logger.WARNING)
    builder = t.Builder(logger)
    net_flags = 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(net_flags)
    # The parser owns the memory of the weights the network points to: it must live until the build has run
    # (developer guide, "The Build Phase"), hence the name held to the end of this function.
    parser = _parse_onnx(t, network, logger, onnx_path)
    _check_inputs(network, inputs, onnx_path)

    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(t.BuilderFlag, flag))
    if cfg.refit:
        config.set_flag(t.BuilderFlag.REFIT)
    config.builder_optimization_level = cfg.builder_optimization_level
    if cfg.workspace_bytes is not None:
        config.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)

    profile = builder.create_optimization_profile()
    shapes: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        mn, opt, mx = profile_shapes(spec, envs)
        profile.set_shape(spec.name, t.Dims(mn), t.Dims(opt), t.Dims(mx))
        shapes[spec.name] = {"min": mn, "opt": opt, "max": mx}
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache, loaded_entries, loaded = _load_timing_cache(config, cache_path, progress)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    del parser
    if plan is None:
        raise TensorRTBuildError(
            f"{onnx_path}: TensorRT {t.__version__} could not build a {cfg.precision} engine (the builder's log above "
            "says why: unsupported layer, out of memory, or an invalid profile)")
    atomic_write(engine_path, plan)
    size = engine_path.stat().st_size

    grown = config.get_timing_cache() or cache
    entries = len(grown.queryKeys())
    if cache_path is not None:
        atomic_write(cache_path, grown.serialize())
    return {
        "tensorrt_version": t.__version__,
        "precision": cfg.precision,
        "strongly_typed": strongly_typed,
        "builder_flags": flags + (["REFIT"] if cfg.refit else []),
        "builder_optimization_level": cfg.builder_optimization_level,
        "workspace_bytes": cfg.workspace_bytes,
        "refit": cfg.refit,
        "batch": {"min": mn_env[graph_io.BATCH], "opt": opt_env[graph_io.BATCH], "max": mx_env[graph_io.BATCH]},
        "sizes": {k: [env[graph_io.WM], env[graph_io.HM]] for k, env in zip(("min", "opt", "max"), envs, strict=True)
                  if graph_io.HM in env},  # in pixel multiples, [W, H]
        "profile": shapes,
        "build_seconds": round(seconds, 3),
        "size_bytes": size,
        "timing_cache": {"loaded": loaded, "loaded_entries": loaded_entries, "entries": entries,
                         "new_entries": entries - loaded_entries, "hit": loaded and entries == loaded_entries},
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "gpu_memory_bytes": gpu.get("total_memory_bytes"),
    }


# ---- a bundle's engines ---------------------------------------------------------------------------------------

def engine_file(precision: str, graph: str) -> str:
    return f"{ENGINES_DIR}/{BACKEND}/{precision}/{graph}.plan"


def engine_entry_key(precision: str, graph: str) -> str:
    """The manifest.engines key of one engine."""
    return ROW.slot("cuda", precision, graph)


def engine_key(graph_key: str, cfg: TrtBuildConfig, trt_version: str, gpu: dict[str, Any],
               envs: Sequence[Mapping[str, int]]) -> str:
    """Hash of everything an engine is made from: unchanged key and file = nothing to rebuild."""
    parts = {"graph": graph_key, "precision": cfg.precision, "opt_level": cfg.builder_optimization_level,
             "refit": cfg.refit, "workspace": cfg.workspace_bytes, "profile": [dict(e) for e in envs],
             "tensorrt": trt_version, "gpu": gpu["name"], "cc": gpu["compute_capability"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _up_to_date(bundle: Path, manifest: Manifest, entry: EngineEntry | None, key: str) -> bool:
    if entry is None or entry.key != key or not entry.files:
        return False
    if any(f not in manifest.files for f in entry.files):
        return False
    try:
        verify_files(bundle, manifest, only=entry.files)
    except BundleError:
        return False
    return True


@writes_bundle
def build_bundle_engines(bundle: str | Path, cfg: TrtBuildConfig, graphs: Sequence[str] | None = None,
                         trt: ModuleType | None = None, gpu: dict[str, Any] | None = None,
                         progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """Build (or keep) `engines/tensorrt/<precision>/<graph>.plan` for the bundle's graphs; updates the manifest.

    `graphs`: names from the manifest (default: all it has, in contract order). An engine whose key (graph key,
    build settings, TensorRT version, GPU) and file hash are unchanged is kept ("up to date").
    """
    root = Path(bundle)
    manifest = read_manifest(root)
    t = trt or import_tensorrt()
    gpu = gpu if gpu is not None else gpu_info()
    order = [g for g in graph_io.ALL_GRAPHS if g in manifest.graphs]
    order += [g for g in manifest.graphs if g not in graph_io.ALL_GRAPHS]
    names = list(graphs) if graphs is not None else order
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise BundleError(f"{root}: no graph {', '.join(unknown)} in the manifest (it has "
                          f"{', '.join(manifest.graphs) or 'none'}); export it with `r2r-export onnx --out {root}`")
    batch_opt = cfg.batch_opt if cfg.batch_opt is not None else manifest.batch_max
    if not manifest.batch_min <= batch_opt <= manifest.batch_max:
        raise ValueError(f"batch_opt {batch_opt} is outside the bundle's batch range "
                         f"{manifest.batch_min}..{manifest.batch_max}")
    cache_rel = cfg.timing_cache
    entries = []
    for name in names:
        graph = manifest.graphs[name]
        envs = profile_envs(manifest, name, batch_opt, cfg.sizes)
        rel = engine_file(cfg.precision, name)
        entry_key = engine_entry_key(cfg.precision, name)
        key = engine_key(graph.key, cfg, t.__version__, gpu, envs)
        old = manifest.engines.get(entry_key)
        if _up_to_date(root, manifest, old, key):
            assert old is not None
            progress(f"  {name:<11} up to date ({rel})")
            entries.append(old)
            continue
        graph_files = [f for f in manifest.files if f.startswith(str(Path(graph.file).parent) + "/")]
        verify_files(root, manifest, only=graph_files)  # never build from a graph that is not the recorded one
        info = build_engine(bundle_path(root, graph.file), bundle_path(root, rel), graph.inputs, envs, cfg, trt=t,
                            timing_cache=bundle_path(root, cache_rel), gpu=gpu,
                            progress=progress)
        info["graph_key"] = graph.key
        info["config"] = {**asdict(cfg), "batch_opt": batch_opt}  # what a refit re-keys the engine with
        record_file(root, manifest, rel)
        record_file(root, manifest, cache_rel)
        entry = EngineEntry(BACKEND, cfg.precision, name, [rel], key, info)
        manifest.engines[entry_key] = entry
        write_manifest(root, manifest)  # after each engine: an interrupted run keeps what it built
        entries.append(entry)
        cache = info["timing_cache"]
        cache_note = "hit" if cache["hit"] else f"+{cache['new_entries']} entries"
        progress(f"  {name:<11} built in {info['build_seconds']:.1f} s ({info['size_bytes'] / 1e6:.1f} MB, "
                 f"{cfg.precision}, timing cache {cache_note})")
    return entries


@writes_bundle
def record_example_canaries(bundle: str | Path, progress: Callable[[str], None] = log) -> list[str]:
    """The graphs' canaries at the bundle's example size: static-size engines take no other size, so the runtime
    checks them there (export recorded the smallest size's)."""
    manifest = read_manifest(bundle)
    made = record_graph_canaries(Path(bundle), manifest, (manifest.width, manifest.height), progress=progress)
    if made:
        write_manifest(bundle, manifest)
    return made


# ---- refit ----------------------------------------------------------------------------------------------------

def refit_engine(engine_path: str | Path, onnx_path: str | Path, names: Collection[str] | None,
                 trt: ModuleType | None = None) -> dict[str, Any]:
    """Give the refittable engine at `engine_path` the weights `names` (ONNX initializer names, which is how
    TensorRT's ONNX parser names weights; None: every refittable weight) from the graph at `onnx_path`, and write
    the refitted plan in its place, atomically. The flow of the developer guide's "Refitting an Engine": Refitter,
    set_named_weights, then the weights TensorRT reports missing (ones it combined with those set), refit."""
    from r2r.export.weight_map import read_initializers

    t = trt or import_tensorrt()
    engine_path, onnx_path = Path(engine_path), Path(onnx_path)
    logger = t.Logger(t.Logger.WARNING)
    engine = t.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineCompatError(f"{engine_path}: TensorRT {t.__version__} could not deserialize this engine (the "
                                "TensorRT log above says why)")
    if not engine.refittable:
        raise TensorRTBuildError(f"{engine_path}: built without --refit; rebuild it with `r2r-export build-engines "
                                 "--backend tensorrt --refit`")
    refitter = t.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    want = set(refittable if names is None else names)
    if want - refittable:
        raise TensorRTBuildError(f"{engine_path}: weights {', '.join(sorted(want - refittable)[:3])} changed but "
                                 "TensorRT cannot refit them in this engine (it folded them); rebuild the engine")
    held = []  # TensorRT reads the arrays' memory at refit_cuda_engine: they must live until then

    def give(names: Collection[str]) -> None:
        found = read_initializers(onnx_path, names)
        for name in sorted(names):
            if name not in found:
                raise TensorRTBuildError(f"{engine_path}: TensorRT asks for weights {name}, which {onnx_path} lacks")
            held.append(np.ascontiguousarray(found[name]))
            if not refitter.set_named_weights(name, t.Weights(held[-1])):
                raise TensorRTBuildError(f"{engine_path}: TensorRT refused the new weights {name} (the log above "
                                         "says why: another count or type)")

    t0 = time.perf_counter()
    give(want)
    missing = [] if not want else list(refitter.get_missing_weights())
    give(missing)
    if want and not refitter.refit_cuda_engine():
        raise TensorRTBuildError(f"{engine_path}: TensorRT could not refit the engine (the log above says why)")
    if want:
        atomic_write(engine_path, engine.serialize())
    return {"weights_set": len(want) + len(missing), "missing_supplied": len(missing),
            "refit_seconds": round(time.perf_counter() - t0, 3)}


@writes_bundle
def refit_bundle_engines(bundle: str | Path, changed: Mapping[str, tuple[str, Sequence[str]]],
                         trt: ModuleType | None = None, gpu: dict[str, Any] | None = None,
                         progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """Refit the bundle's TensorRT engines whose graph was refitted: `changed` maps a graph to (its key before the
    refit, the initializers whose values changed). An engine built from that key takes only those; one built from
    another (an interrupted earlier refit) takes every weight; one already built from the graph's key is kept.
    Each engine is re-keyed as a fresh build from the refitted graph would be, and the manifest written after each."""
    root = Path(bundle)
    manifest = read_manifest(root)
    t = trt or import_tensorrt()
    gpu = gpu if gpu is not None else gpu_info()
    done = []
    for slot, entry in sorted(manifest.engines.items()):
        graph = manifest.graphs.get(entry.graph)
        if entry.backend != BACKEND or graph is None or entry.info.get("graph_key") == graph.key:
            continue
        if "config" not in entry.info or not entry.info.get("refit"):
            raise TensorRTBuildError(f"TensorRT engine {entry.graph} ({entry.precision}) was built without --refit; "
                                     f"rebuild it with `{rebuild_command(entry.precision, root)} --refit`")
        before, names = changed.get(entry.graph, ("", ()))
        fields = dict(entry.info["config"])
        batch_opt = int(fields.pop("batch_opt"))
        cfg = TrtBuildConfig(**fields)
        info = refit_engine(bundle_path(root, entry.files[0]), bundle_path(root, graph.file),
                            list(names) if entry.info["graph_key"] == before else None, trt=t)
        envs = profile_envs(manifest, entry.graph, batch_opt, cfg.sizes)
        entry.key = engine_key(graph.key, cfg, t.__version__, gpu, envs)
        entry.info.update(graph_key=graph.key, last_refit=info)
        for f in entry.files:
            record_file(root, manifest, f)
        write_manifest(root, manifest)
        done.append(entry)
        progress(f"  {slot:<36} refitted in {info['refit_seconds']:.2f} s ({info['weights_set']} weights set)")
    return done


# ---- the runtime's check --------------------------------------------------------------------------------------

def rebuild_command(precision: str, bundle: str | Path | None = None) -> str:
    return f"r2r-export build-engines --backend {BACKEND} --precision {precision} --out {bundle or 'BUNDLE'}"


def check_engine_compat(manifest: Manifest, trt_version: str, gpu_name: str, cc: str | tuple[int, int], *,
                        precision: str | None = None, bundle: str | Path | None = None,
                        current: bool = True) -> list[EngineEntry]:
    """Refuse engines built for another TensorRT version or GPU (a plan only runs where it was built) and, if
    `current`, engines built from another version of their graph (exported or refitted since).

    Returns the bundle's TensorRT engines (of `precision`, if given); raises EngineCompatError naming the
    rebuild command when there are none or any differs.
    """
    want_cc = cc if isinstance(cc, str) else f"{cc[0]}.{cc[1]}"
    engines = [e for e in manifest.engines.values()
               if e.backend == BACKEND and (precision is None or e.precision == precision)]
    if not engines:
        which = f"{precision} " if precision else ""
        raise EngineCompatError(f"the bundle has no TensorRT {which}engines; build them with "
                                f"`{rebuild_command(precision or 'fp16', bundle)}`")
    for e in engines:
        graph = manifest.graphs.get(e.graph)
        if current and graph is not None and e.info.get("graph_key", graph.key) != graph.key:
            raise EngineCompatError(
                f"TensorRT engine {e.graph} ({e.precision}) was built from another {e.graph} graph than the bundle's "
                f"(the graph was exported or refitted since); rebuild it with `{rebuild_command(e.precision, bundle)}`"
                " or, if it was built with --refit, run `r2r-export refit` again")
        built = (e.info.get("tensorrt_version"), e.info.get("gpu_name"), str(e.info.get("compute_capability")))
        if built != (trt_version, gpu_name, want_cc):
            raise EngineCompatError(
                f"TensorRT engine {e.graph} ({e.precision}) was built with TensorRT {built[0]} for {built[1]} "
                f"(compute capability {built[2]}); this machine has TensorRT {trt_version} and {gpu_name} "
                f"(compute capability {want_cc}). Rebuild the engines here with "
                f"`{rebuild_command(e.precision, bundle)}`")
    return engines


def build(bundle: str | Path, request: BuildRequest, progress: Callable[[str], None] = log) -> list[EngineEntry]:
    """The backend table's builder entry (`r2r-export build-engines --backend tensorrt`)."""
    entries = build_bundle_engines(bundle, TrtBuildConfig(precision=request.precision,
                                                          builder_optimization_level=request.opt_level,
                                                          refit=request.refit,
                                                          sizes="opt" if request.static_size else "range"),
                                   progress=progress)
    if request.static_size:
        record_example_canaries(bundle, progress)
    return entries


__all__ = [
    "BACKEND", "PRECISIONS", "ROW", "TIMING_CACHE", "EngineCompatError", "OnnxTypes", "TensorRTBuildError",
    "TrtBuildConfig", "build", "build_bundle_engines", "build_engine", "check_engine_compat", "engine_entry_key",
    "engine_file", "engine_key", "inspect_onnx", "network_plan", "profile_envs", "profile_shapes",
    "rebuild_command", "record_example_canaries", "refit_bundle_engines", "refit_engine",
]
