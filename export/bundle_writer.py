"""`r2r-export onnx`: a model directory + embedding -> a bundle (graphs, conditioning, manifest).

Each artefact has a key: the hash of what it is made from (the relevant weights, resolution, batch
range, TAC plan, tool versions). A re-run with an unchanged key rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from r2r import __version__, graph_io
from r2r.atomic import atomic_dir, atomic_path
from r2r.config import Method
from r2r.export.canary import Runner, record_canaries, record_graph_canaries
from r2r.export.graphs import (
    STEP_SPECS,
    TEXT_ENCODER_SPEC,
    VAE_SPECS,
    DdimStep,
    GraphSpec,
    GuidedStep,
    GuidedTextStep,
    TextEncoder,
    UNetDeep,
    UNetEmit,
    UNetInject,
    UNetRouted,
    UNetShallow,
    VaeDecoder,
    VaeEncoder,
    unet_specs,
)
from r2r.export.to_onnx import OPSET, Sizes, export_graph
from r2r.export.weight_map import ParamIndex, weight_map, write_map
from r2r.locks import bundle_lock
from r2r.log import log
from r2r.manifest import (
    COND_FILE,
    ENGINES_DIR,
    ONNX_DIR,
    REFIT_DIR,
    GraphEntry,
    Manifest,
    TensorSpec,
    bundle_path,
    read_manifest,
    record_file,
    verify_files,
    write_manifest,
)
from r2r.models import (
    Components,
    encode_conditioning,
    load_components,
    load_embedding,
    model_defaults,
    sha256_file,
    sha256_trees,
)
from r2r.step_cache import check_unet, deep_channels, step_cache_supported
from r2r.tac import TACPlan, TACState, install_tac, pixel_multiple, plan_tac

# Default side range of a dynamic bundle, pixels: from two pixel multiples (the UNet's deepest level two cells
# wide) to this.
DEFAULT_MAX_SIDE = 2048


@dataclass(frozen=True)
class ExportConfig:
    model: Path
    embedding: Path
    out: Path
    width: int  # the example (and TensorRT "opt") size
    height: int
    batch_max: int = 4
    tac_divisor: int = 256
    graphs: tuple[str, ...] = graph_io.DEFAULT_GRAPHS
    attention_pool: int = 1  # the first level's keys and values pooled (docs/design.md, "Less work per image")
    min_side: int | None = None  # None: two pixel multiples
    max_side: int | None = DEFAULT_MAX_SIDE
    static: bool = False  # graphs of the example size only (TensorRT builds static engines from them)
    refit: bool = False  # record each weight graph's weight map, so that `r2r-export refit` can swap its weights
    donors: tuple[Path, ...] = ()  # other bundles whose graphs of the same key are copied, not exported again
    text_encoder: bool = True  # the prompt encoder and tokenizer beside the graphs (`--prompt` at run time)

    def sizes(self, multiple: int) -> Sizes:
        """The size range of the bundle, checked: sides multiples of the model's pixel multiple."""
        for name, v in (("width", self.width), ("height", self.height)):
            if v % multiple:
                raise ValueError(f"--{name} {v}: this model takes sides that are multiples of {multiple}")
        if self.static:
            return Sizes(multiple)
        lo = self.min_side or 2 * multiple
        hi = self.max_side or DEFAULT_MAX_SIDE
        if lo % multiple or hi % multiple or lo < 2 * multiple or not lo <= min(self.width, self.height) \
                or max(self.width, self.height) > hi:
            raise ValueError(f"sides {lo}..{hi} must be multiples of {multiple} from {2 * multiple}, around the "
                             f"example size {self.width}x{self.height}")
        return Sizes(multiple, (lo, hi), (lo, hi))


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def artefact_keys(cfg: ExportConfig, plan: TACPlan, sizes: Sizes, hashes: ModelHashes,
                  tools: dict[str, str]) -> dict[str, str]:
    """The key of every graph and of the conditioning ("cond"): the hash of what each is made from. A refit computes
    them as the fresh export of its model would, so a refitted bundle is that export's, key for key."""
    shape_key = (cfg.width, cfg.height, cfg.batch_max, sizes.width, sizes.height)
    part_hash = hashes.parts
    return {
        **{g: _key(g, part_hash["unet"], shape_key, plan.as_dict(), tools) for g in unet_specs(plan)},
        **{g: _key(g, part_hash["vae"], shape_key, tools) for g in VAE_SPECS},
        **{g: _key(g, shape_key, tools) for g in STEP_SPECS},
        "cond": _key(part_hash["text_encoder"], part_hash["tokenizer"], hashes.embedding, tools["r2r"]),
        graph_io.TEXT_ENCODER: _key(graph_io.TEXT_ENCODER, part_hash["text_encoder"], part_hash["tokenizer"],
                                    hashes.embedding, cfg.batch_max, tools),
    }


@dataclass(frozen=True)
class ModelHashes:
    model: str  # the whole model folder
    parts: dict[str, str]  # each part a bundle is made from
    embedding: str


def model_hashes(model_dir: Path, embedding: Path) -> ModelHashes:
    """What a bundle is made from, hashed (each file of the model read once)."""
    tree, parts = sha256_trees(model_dir, ("unet", "vae", "text_encoder", "tokenizer"))
    return ModelHashes(tree, parts, sha256_file(embedding))


def bundle_config(manifest: Manifest, model: Path, embedding: Path, out: Path) -> ExportConfig:
    """The export configuration a bundle was made with, for another model (a refit)."""
    sizes = manifest.sizes
    static = bool(sizes.get("static", sizes["min"] == sizes["max"]))
    return ExportConfig(model, embedding, out, manifest.width, manifest.height, manifest.batch_max,
                        int(manifest.schedule["defaults"]["tac_divisor"]), tuple(manifest.graphs),
                        min_side=None if static else min(sizes["min"]), max_side=None if static else max(sizes["max"]),
                        static=static, refit=True, attention_pool=int(manifest.tac_plan.get("pool", 1)),
                        text_encoder=bool(manifest.text_encoder))


def source_of(model_dir: Path, embedding: Path, hashes: ModelHashes) -> dict[str, object]:
    """The manifest's record of what a bundle was made from."""
    return {"model": model_dir.name, "model_sha256": hashes.model, "parts_sha256": hashes.parts,
            "embedding": Path(embedding).name, "embedding_sha256": hashes.embedding}


def tool_versions() -> dict[str, str]:
    """Everything besides the weights that shapes a graph, the graph-defining source included."""
    import onnx

    from r2r import step_cache, tac
    from r2r.export import graphs, to_onnx

    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (graphs, to_onnx, tac, step_cache))
                          ).hexdigest()
    return {"r2r": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": str(OPSET),
            "graph_code": code[:16]}


def _graph_file(name: str) -> str:
    return f"{ONNX_DIR}/{name}/{name}.onnx"


def _files_of(bundle: Path, rel: str) -> list[str]:
    """The graph file and any external-data files beside it, relative to the bundle."""
    folder = bundle_path(bundle, rel).parent
    return sorted(str(p.relative_to(bundle.resolve())) for p in folder.iterdir() if p.is_file())


def example_inputs(name: str, comps: Components, plan: TACPlan, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Inputs of graph `name` at h x w pixels: what the exporter traces with and a refit checks with."""
    g = torch.Generator().manual_seed(0)
    d = comps.text_encoder.config.hidden_size
    c = int(comps.unet.config.in_channels)  # the latent's channels (4 in SD 1.x; read, not assumed)
    t = torch.tensor([261.0])

    def unet_args(k: int) -> tuple[torch.Tensor, ...]:
        return torch.randn(2 * k, c, h // 8, w // 8, generator=g), t, torch.randn(2 * k, 77, d, generator=g)

    if name == graph_io.UNET_INJECT:
        qk = [torch.randn(2, h // 8 >> level, w // 8 >> level, lyr.channels, generator=g)
              for lyr in plan.layers for level in (lyr.level, plan.key_level(lyr))]
        return (*unet_args(2), *qk)
    if name in graph_io.ROUTED_GRAPHS:  # a non-identity routing: the exporter must not fold the gather away
        routed = (*unet_args(1), torch.tensor([1, 0], dtype=torch.int64))
        if name == graph_io.UNET_SHALLOW:
            return (*routed, torch.randn(2, deep_channels(comps.unet.config), h // 8, w // 8, generator=g))
        return routed
    if name == graph_io.UNET_EMIT:
        return unet_args(1)
    if name == graph_io.VAE_ENCODER:
        return (torch.rand(2, 3, h, w, generator=g) * 2 - 1,)
    if name in graph_io.STEP_GRAPHS:
        k = {graph_io.DDIM_STEP: 2, graph_io.GUIDED_STEP: 4, graph_io.GUIDED_TEXT_STEP: 6}[name]
        lat = torch.randn(2, c, h // 8, w // 8, generator=g)
        step = (lat, torch.randn(k, c, h // 8, w // 8, generator=g), torch.tensor([0.9, 0.1, 7.5]))
        return (*step, torch.tensor([1.5, 0.0])) if name == graph_io.GUIDED_TEXT_STEP else step
    return (torch.randn(2, int(comps.vae.config.latent_channels), h // 8, w // 8, generator=g),)


def graph_module(name: str, comps: Components, plan: TACPlan, state: TACState) -> torch.nn.Module:
    """The torch module graph `name` is exported from (`state`: the TAC processors installed on comps.unet)."""
    modules: dict[str, Callable[[], torch.nn.Module]] = {
        graph_io.UNET: lambda: UNetRouted(comps.unet, state),
        graph_io.UNET_EMIT: lambda: UNetEmit(comps.unet, state, plan),
        graph_io.UNET_DEEP: lambda: UNetDeep(comps.unet, state),
        graph_io.UNET_SHALLOW: lambda: UNetShallow(comps.unet, state),
        graph_io.UNET_INJECT: lambda: UNetInject(comps.unet, state),
        graph_io.VAE_ENCODER: lambda: VaeEncoder(comps.vae),
        graph_io.VAE_DECODER: lambda: VaeDecoder(comps.vae),
        graph_io.DDIM_STEP: DdimStep,
        graph_io.GUIDED_STEP: GuidedStep,
        graph_io.GUIDED_TEXT_STEP: GuidedTextStep,
    }
    return modules[name]()


# The graphs the torch backend runs as the model's modules (a bundle without ONNX graphs records their canaries).
TORCH_GRAPHS = (*graph_io.UNET_GRAPHS, *graph_io.STEP_CACHE_GRAPHS, graph_io.VAE_ENCODER, graph_io.VAE_DECODER)


def torch_runner(comps: Components, plan: TACPlan, state: TACState) -> Runner:
    """Each graph's torch module at fp32 (what the graph is exported from), inputs in the contract's order."""
    specs = graph_specs(plan)

    def run(graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = specs[graph]
        module = graph_module(graph, comps, plan, state).eval()
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n, _, _ in spec.inputs))
        outs = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy().astype(np.float32) for (n, _, _), o in zip(spec.outputs, outs, strict=True)}

    return run


def graph_specs(plan: TACPlan) -> dict[str, GraphSpec]:
    return {**unet_specs(plan), **VAE_SPECS, **STEP_SPECS}


def _donor_manifests(donors: tuple[Path, ...], out: Path) -> list[tuple[Path, Manifest]]:
    """The donor bundles that can be read, each manifest read once per export (not this bundle itself)."""
    found = []
    for donor in donors:
        if donor.resolve() == out.resolve():
            continue
        try:
            found.append((donor, read_manifest(donor)))
        except (ValueError, OSError):
            continue
    return found


def _copy_folders(donor: Path, theirs: Manifest, folders: tuple[str, ...], out: Path, manifest: Manifest) -> bool:
    """Copy the donor's files under `folders` (bundle-relative) into `out`, each folder replaced atomically, what they
    hold hashed again after the copy (a donor rewritten meanwhile gives nothing); True if copied."""
    by_folder = {d: [f for f in theirs.files if f.startswith(f"{d}/")] for d in folders}
    if not all(by_folder.values()):
        return False
    try:
        for folder, files in by_folder.items():
            with atomic_dir(bundle_path(out, folder)) as tmp:
                for f in files:
                    src = bundle_path(donor, f)
                    shutil.copyfile(src, tmp / src.name)
                    if sha256_file(tmp / src.name) != theirs.files[f]:
                        raise ValueError(f"{src} changed")
    except (ValueError, OSError):
        return False
    manifest.files.update({f: theirs.files[f] for files in by_folder.values() for f in files})
    return True


def _copy_from_donor(donors: list[tuple[Path, Manifest]], name: str, key: str, out: Path,
                     manifest: Manifest) -> bool:
    """Copy graph `name` from the first donor bundle that holds it at `key` with its files intact; True if copied."""
    for donor, theirs in donors:
        entry = theirs.graphs.get(name)
        if entry is None or entry.key != key or not _copy_folders(donor, theirs, (f"{ONNX_DIR}/{name}",), out,
                                                                  manifest):
            continue
        manifest.graphs[name] = entry
        bundle_path(out, map_file(name)).unlink(missing_ok=True)  # the map of the graph this one replaced
        return True
    return False


def export_bundle(cfg: ExportConfig, progress: Callable[[str], None] = log) -> Manifest:
    """Write or refresh the bundle at cfg.out, holding its writer lock (another process exporting or building the
    same bundle finishes first; then what it wrote is reused); returns its manifest."""
    with bundle_lock(cfg.out, progress):
        return _export_bundle(cfg, progress)


def _export_bundle(cfg: ExportConfig, progress: Callable[[str], None]) -> Manifest:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    comps = load_components(cfg.model)
    plan = plan_tac(comps.unet.config, cfg.width, cfg.height, cfg.tac_divisor, cfg.attention_pool)
    if any(g in graph_io.STEP_CACHE_GRAPHS for g in cfg.graphs):
        check_unet(comps.unet.config)
    caches = step_cache_supported(comps.unet.config)
    multiple = pixel_multiple(comps.unet.config)
    sizes = cfg.sizes(multiple)
    tools = tool_versions()
    model_dir = comps.model_dir
    hashes = model_hashes(model_dir, cfg.embedding)
    keys = artefact_keys(cfg, plan, sizes, hashes, tools)
    try:
        old = read_manifest(out)
    except ValueError:
        old = None

    manifest = Manifest(
        source=source_of(model_dir, cfg.embedding, hashes),
        width=cfg.width, height=cfg.height, batch_min=1, batch_max=cfg.batch_max,
        sizes={"multiple": multiple, "opt": [cfg.width, cfg.height],
               "min": [sizes.width[0], sizes.height[0]] if sizes.dynamic else [cfg.width, cfg.height],
               "max": [sizes.width[1], sizes.height[1]] if sizes.dynamic else [cfg.width, cfg.height],
               "static": not sizes.dynamic},
        latent={"channels": int(comps.unet.config.in_channels), "height": cfg.height // 8, "width": cfg.width // 8,
                **({"deep_channels": deep_channels(comps.unet.config)} if caches else {})},
        scaling_factor=comps.scaling_factor,
        tac_plan={**plan.as_dict(), "target": "null"},
        schedule={"scheduler": comps.scheduler.as_dict(),
                  "defaults": Method(tac_divisor=cfg.tac_divisor, attention_pool=cfg.attention_pool,
                                     cache_interval=model_defaults(model_dir).cache_interval).as_dict()},
        tools=tools,
    )
    if old is not None:  # engines keep their own keys (and file hashes); the engine builders re-check them
        manifest.engines = old.engines
        manifest.files.update({f: h for f, h in old.files.items() if f.startswith(f"{ENGINES_DIR}/")})

    def reusable(name: str, files: list[str]) -> bool:
        if old is None:
            return False
        entry_key = old.graphs[name].key if name in old.graphs else old.cond.get("key")
        if entry_key != keys[name]:
            return False
        try:
            verify_files(out, old, only=files)
        except ValueError:
            return False
        return all(f in old.files for f in files)

    # Conditioning (text encoder + embedding), computed once: the runtime needs no text encoder.
    if old is not None and reusable("cond", [COND_FILE]):
        manifest.cond = old.cond
        manifest.files[COND_FILE] = old.files[COND_FILE]
        progress(f"  cond        up to date ({COND_FILE})")
    else:
        t0 = time.perf_counter()
        c_null, c_neg = encode_conditioning(comps, cfg.embedding)
        path = bundle_path(out, COND_FILE)
        with atomic_path(path) as tmp:
            save_file({graph_io.COND_NULL: c_null.contiguous(), graph_io.COND_NEG: c_neg.contiguous()}, str(tmp))
        record_file(out, manifest, COND_FILE)
        manifest.cond = {"file": COND_FILE, "key": keys["cond"], "tensors": [
            TensorSpec(graph_io.COND_NULL, list(c_null.shape), "float32").__dict__,
            TensorSpec(graph_io.COND_NEG, list(c_neg.shape), "float32").__dict__]}
        progress(f"  cond        built in {time.perf_counter() - t0:.1f} s ({path.stat().st_size / 1e3:.0f} kB)")

    donors = _donor_manifests(cfg.donors, out)
    _text_encoder(cfg, comps, keys[graph_io.TEXT_ENCODER], manifest, old, donors, progress)
    state = install_tac(comps.unet, plan)
    specs = graph_specs(plan)
    for name in cfg.graphs:
        rel = _graph_file(name)
        old_files = [f for f in old.files if f.startswith(f"{ONNX_DIR}/{name}/")] if old is not None else []
        if old is not None and name in old.graphs and old_files and reusable(name, old_files):
            manifest.graphs[name] = old.graphs[name]
            kept = old_files + [m for m in [old.graphs[name].refit_map] if m in old.files]
            manifest.files.update({f: old.files[f] for f in kept})
            progress(f"  {name:<11} up to date ({rel})")
            continue
        if _copy_from_donor(donors, name, keys[name], out, manifest):
            progress(f"  {name:<11} copied ({rel}: the same graph, from a bundle beside this one)")
            continue
        t0 = time.perf_counter()
        module = graph_module(name, comps, plan, state).eval()
        inputs, outputs, external = export_graph(module, example_inputs(name, comps, plan, cfg.height, cfg.width),
                                                 specs[name], bundle_path(out, rel), cfg.batch_max, sizes)
        for f in _files_of(out, rel):
            record_file(out, manifest, f)
        manifest.graphs[name] = GraphEntry(rel, inputs, outputs, keys[name], external)
        bundle_path(out, map_file(name)).unlink(missing_ok=True)  # the map of the graph this one replaced
        size = sum(bundle_path(out, f).stat().st_size for f in _files_of(out, rel))
        progress(f"  {name:<11} exported in {time.perf_counter() - t0:.1f} s ({size / 1e6:.1f} MB"
                 f"{', external data' if external else ''})")
    for name in old.graphs if old is not None else {}:
        if name in graph_io.ALL_GRAPHS and name not in manifest.graphs:  # left out by this export: its files too
            shutil.rmtree(bundle_path(out, _graph_file(name)).parent, ignore_errors=True)
            bundle_path(out, map_file(name)).unlink(missing_ok=True)
    # Canaries: kept where their graph is unchanged, recorded where missing (docs/design.md, "Verified engines")
    if old is not None:
        manifest.canaries = dict(old.canaries)
        manifest.files.update({e["file"]: old.files[e["file"]] for e in old.canaries.values()
                               if e["file"] in old.files})
    if manifest.graphs:
        record_graph_canaries(out, manifest, progress=progress)
    else:  # a bundle for the torch backend: the modules it runs, at fp32
        torch_graphs = [g for g in TORCH_GRAPHS if caches or g not in graph_io.STEP_CACHE_GRAPHS]
        record_canaries(out, manifest, {g: keys[g] for g in torch_graphs}, torch_runner(comps, plan, state),
                        f"torch {torch.__version__} fp32", progress=progress)
    write_manifest(out, manifest)
    if cfg.refit:  # after the graphs are recorded: a model that cannot be mapped leaves a usable bundle
        _record_weight_maps(out, manifest, comps, progress)
        write_manifest(out, manifest)
    return manifest


# The tokenizer's files a bundle carries (text: the vocabulary, merges and configs; nothing executable).
TOKENIZER_SUFFIXES = (".json", ".txt")


def _text_encoder(cfg: ExportConfig, comps: Components, key: str, manifest: Manifest, old: Manifest | None,
                  donors: list[tuple[Path, Manifest]], progress: Callable[[str], None]) -> None:
    """The prompt encoder (docs/design.md, "Prompts"): the model's text encoder as an fp32 graph and its tokenizer's
    files, both hashed in the manifest; kept where its key is unchanged, copied from a donor bundle that has it at
    that key, removed where the export leaves it out."""
    out, rel = cfg.out, _graph_file(graph_io.TEXT_ENCODER)
    folders = (bundle_path(out, rel).parent, bundle_path(out, graph_io.TOKENIZER_DIR))
    if not cfg.text_encoder:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if old is not None and old.text_encoder.get("key") == key:
        files = [f for f in old.files if any(f.startswith(f"{p}/") for p in (f"{ONNX_DIR}/{graph_io.TEXT_ENCODER}",
                                                                              graph_io.TOKENIZER_DIR))]
        try:
            verify_files(out, old, only=files)
        except ValueError:
            files = []
        if files:
            manifest.text_encoder = old.text_encoder
            manifest.files.update({f: old.files[f] for f in files})
            progress(f"  {graph_io.TEXT_ENCODER:<11} up to date ({rel})")
            return
    for donor, theirs in donors:
        if theirs.text_encoder.get("key") == key and _copy_folders(
                donor, theirs, (f"{ONNX_DIR}/{graph_io.TEXT_ENCODER}", graph_io.TOKENIZER_DIR), out, manifest):
            manifest.text_encoder = theirs.text_encoder
            progress(f"  {graph_io.TEXT_ENCODER:<11} copied ({rel}: the same encoder, from a bundle beside this one)")
            return
    t0 = time.perf_counter()
    te = comps.text_encoder.float().eval()
    ids = torch.tensor(comps.tokenizer(["a photo", ""], padding="max_length",
                                       max_length=comps.tokenizer.model_max_length).input_ids, dtype=torch.int64)
    inputs, outputs, external = export_graph(TextEncoder(te).eval(), (ids,), TEXT_ENCODER_SPEC, bundle_path(out, rel),
                                             cfg.batch_max, Sizes(1))
    with atomic_dir(folders[1]) as tmp:
        for src in sorted((comps.model_dir / graph_io.TOKENIZER_DIR).iterdir()):
            if src.is_file() and src.suffix in TOKENIZER_SUFFIXES:
                shutil.copyfile(src, tmp / src.name)
    files = _files_of(out, rel) + sorted(f"{graph_io.TOKENIZER_DIR}/{p.name}" for p in folders[1].iterdir())
    for f in files:
        record_file(out, manifest, f)
    manifest.text_encoder = {"file": rel, "tokenizer": graph_io.TOKENIZER_DIR, "key": key,
                             "token": load_embedding(cfg.embedding)[0], "external_data": external,
                             "inputs": [t.__dict__ for t in inputs], "outputs": [t.__dict__ for t in outputs]}
    size = sum(bundle_path(out, f).stat().st_size for f in files)
    progress(f"  {graph_io.TEXT_ENCODER:<11} exported in {time.perf_counter() - t0:.1f} s ({size / 1e6:.1f} MB, with "
             "its tokenizer)")


def map_file(graph: str) -> str:
    return f"{REFIT_DIR}/{graph}.json"


def part_params(comps: Components, part: str) -> dict[str, np.ndarray]:
    """A model part's parameters as the exported graphs name them ("unet.<name>"), as numpy views."""
    module = comps.unet if part == "unet" else comps.vae
    return {f"{part}.{k}": v.detach().numpy() for k, v in module.state_dict().items()}


def _record_weight_maps(out: Path, manifest: Manifest, comps: Components, progress: Callable[[str], None]) -> None:
    """Make each weight graph refittable: the map of its initializers to the model's parameters, made while the
    model it was exported from is at hand (a reused graph keeps its recorded map)."""
    indexes: dict[str, ParamIndex] = {}
    for name, entry in manifest.graphs.items():
        part = graph_io.WEIGHTS_OF.get(name)
        if part is None or (entry.refit_map and entry.refit_map in manifest.files):
            continue
        t0 = time.perf_counter()
        if part not in indexes:
            indexes[part] = ParamIndex(part_params(comps, part))
        mapping = weight_map(bundle_path(out, entry.file), indexes[part])
        rel = map_file(name)
        write_map(bundle_path(out, rel), name, part, mapping)
        record_file(out, manifest, rel)
        entry.refit_map = rel
        progress(f"  {name:<11} weight map of {len(mapping)} initializers in {time.perf_counter() - t0:.1f} s "
                 f"({rel})")
