"""A refittable bundle's graphs and conditioning made those of another model of the same architecture, without
exporting again (docs/design.md, "Refit"): the ONNX half of `r2r-export refit` (the engines' half is
`r2r.engines.bundle_refit`).

Each weight graph is rewritten through the weight map recorded when the bundle was exported with `--refit`
(`export/weight_map.py`); the conditioning is computed again only if the text encoder, tokenizer or embedding
changed. Every artefact is re-keyed as a fresh export of the new model would key it, so the refitted bundle is that
export's, key for key, and a later `r2r-export onnx --model NEW` finds it up to date.

While a refit runs, the manifest says so (`source["refit_pending"]`, with what is left to rebuild): the runtime
refuses the bundle until a run of the refit has finished, so a half-refitted bundle is never used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from r2r import graph_io
from r2r.atomic import atomic_path
from r2r.export.bundle_writer import (
    artefact_keys,
    bundle_config,
    example_inputs,
    graph_module,
    graph_specs,
    model_hashes,
    part_params,
    source_of,
)
from r2r.export.weight_map import RefitError, read_map, refit_graph
from r2r.log import log
from r2r.manifest import COND_FILE, REFIT_PENDING, Manifest, bundle_path, record_file, verify_files, write_manifest
from r2r.models import Components, encode_conditioning, load_components
from r2r.tac import TACPlan, TACState, install_tac, pixel_multiple, plan_tac

PARITY_BOUND = 1e-4  # max |onnx - torch| / max |torch| on every output: the export's parity bar


@dataclass
class RefitTarget:
    """What the bundle becomes: the new model's components, keys and source record."""

    comps: Components
    embedding: Path
    keys: dict[str, str]
    source: dict[str, Any]
    plan: TACPlan
    check_size: tuple[int, int]  # (width, height) at which a refitted graph is checked: the bundle's smallest
    changed: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # graph -> (key before, initializers)


def check_refittable(bundle: Path, manifest: Manifest) -> None:
    """Every weight graph has its recorded weight map, else the bundle cannot be refitted."""
    lacking = [g for g, e in manifest.graphs.items()
               if g in graph_io.WEIGHTS_OF and (not e.refit_map or e.refit_map not in manifest.files)]
    if lacking:
        raise RefitError(f"{bundle}: the graphs {', '.join(lacking)} have no weight map; make the bundle refittable "
                         f"once, with its own model: `r2r-export onnx --refit --model MODEL --out {bundle}` (or "
                         "`r2r-export build-engines --refit ...`)")


def refit_target(bundle: Path, manifest: Manifest, model: Path, embedding: Path) -> RefitTarget:
    """Load the new model and check that it has the bundle's architecture (TAC plan, sizes, latent, scheduler)."""
    comps = load_components(model)
    cfg = bundle_config(manifest, comps.model_dir, embedding, bundle)
    plan = plan_tac(comps.unet.config, cfg.width, cfg.height, cfg.tac_divisor, cfg.attention_pool)
    multiple = pixel_multiple(comps.unet.config)
    width = int(comps.text_encoder.config.hidden_size)
    have = {"TAC plan": {**plan.as_dict(), "target": "null"}, "pixel multiple": multiple,
            "latent channels": int(comps.unet.config.in_channels), "scaling factor": comps.scaling_factor,
            "scheduler": comps.scheduler.as_dict(), "text width": width}
    want = {"TAC plan": manifest.tac_plan, "pixel multiple": manifest.sizes["multiple"],
            "latent channels": manifest.latent["channels"], "scaling factor": manifest.scaling_factor,
            "scheduler": manifest.schedule["scheduler"], "text width": manifest.cond["tensors"][0]["shape"][-1]}
    have = json.loads(json.dumps(have))  # as the manifest holds it (tuples are lists)
    differ = [k for k in have if have[k] != want[k]]
    if differ:
        raise RefitError(f"{model}: another architecture than the bundle {bundle}'s ({', '.join(differ)} differ); "
                         "export a new bundle with `r2r-export onnx`")
    hashes = model_hashes(comps.model_dir, embedding)
    keys = artefact_keys(cfg, plan, cfg.sizes(multiple), hashes, manifest.tools)
    return RefitTarget(comps, embedding, keys, source_of(comps.model_dir, embedding, hashes), plan,
                       tuple(manifest.sizes["min"]))


def parity_check(name: str, target: RefitTarget, state: TACState) -> Callable[[Path], None]:
    """A check of a refitted graph against the new model's torch module, on the export's example inputs at the
    bundle's smallest size: every output within the export's parity bar (relative error PARITY_BOUND)."""

    def check(path: Path) -> None:
        import onnxruntime as ort

        w, h = target.check_size
        inputs = example_inputs(name, target.comps, target.plan, h, w)
        with torch.no_grad():
            want = graph_module(name, target.comps, target.plan, state).eval()(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        spec = graph_specs(target.plan)[name]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {n: x.numpy() for (n, _, _), x in zip(spec.inputs, inputs, strict=True)}
        got = sess.run([n for n, _, _ in spec.outputs], {i.name: feed[i.name] for i in sess.get_inputs()})
        for (n, _, _), g, wt in zip(spec.outputs, got, want, strict=True):
            ref = wt.numpy()
            err = float(np.abs(g - ref).max() / max(float(np.abs(ref).max()), 1e-12))
            if not err < PARITY_BOUND:
                raise RefitError(f"{path.name}: the refitted {name} graph is not the new model's ({n}: relative "
                                 f"error {err:.1e} against PyTorch); the bundle is left as it was: export a new one "
                                 "with `r2r-export onnx`")

    return check


def begin(bundle: Path, manifest: Manifest, target: RefitTarget, rebuild: list[list[str]]) -> list[list[str]]:
    """Mark the bundle as being refitted (with the engine builds a finished refit owes); returns every build owed,
    this run's and an interrupted run's."""
    owed = manifest.source.get(REFIT_PENDING, {}).get("rebuild", [])
    owed = owed + [r for r in rebuild if r not in owed]
    manifest.source[REFIT_PENDING] = {"model": target.source["model"],
                                      "model_sha256": target.source["model_sha256"], "rebuild": owed}
    write_manifest(bundle, manifest)
    return owed


def refit_graphs(bundle: Path, manifest: Manifest, target: RefitTarget,
                 progress: Callable[[str], None] = log) -> None:
    """Rewrite every weight graph whose key is not the target's; record what changed in `target.changed`."""
    params: dict[str, dict[str, np.ndarray]] = {}
    state = install_tac(target.comps.unet, target.plan)
    for name, entry in manifest.graphs.items():
        part = graph_io.WEIGHTS_OF.get(name)
        new_key = target.keys[name]
        if entry.key == new_key:
            continue
        if part is None:  # a step graph's key does not depend on the model: it cannot differ
            raise RefitError(f"{bundle}: the {name} graph was made with other settings; re-export the bundle")
        graph_files = [f for f in manifest.files if f.startswith(str(Path(entry.file).parent) + "/")]
        verify_files(bundle, manifest, only=[*graph_files, entry.refit_map])
        t0 = time.perf_counter()
        if part not in params:
            params[part] = part_params(target.comps, part)
        mapping = read_map(bundle_path(bundle, entry.refit_map), name, part)
        changed = refit_graph(bundle_path(bundle, entry.file), mapping, params[part],
                              check=parity_check(name, target, state))
        target.changed[name] = (entry.key, changed)
        for f in graph_files:
            record_file(bundle, manifest, f)
        entry.key = new_key
        write_manifest(bundle, manifest)
        progress(f"  {name:<11} refitted in {time.perf_counter() - t0:.1f} s ({len(changed)} of {len(mapping)} "
                 "weights changed)")


def refit_cond(bundle: Path, manifest: Manifest, target: RefitTarget, progress: Callable[[str], None] = log) -> None:
    """The conditioning again, if the text encoder, tokenizer or embedding changed."""
    if manifest.cond.get("key") == target.keys["cond"]:
        return
    t0 = time.perf_counter()
    c_null, c_neg = encode_conditioning(target.comps, target.embedding)
    with atomic_path(bundle_path(bundle, COND_FILE)) as tmp:
        save_file({graph_io.COND_NULL: c_null.contiguous(), graph_io.COND_NEG: c_neg.contiguous()}, str(tmp))
    record_file(bundle, manifest, COND_FILE)
    manifest.cond["key"] = target.keys["cond"]
    write_manifest(bundle, manifest)
    progress(f"  cond        computed again in {time.perf_counter() - t0:.1f} s (text encoder or embedding changed)")


def finish(bundle: Path, manifest: Manifest, target: RefitTarget) -> None:
    """The bundle is the new model's: its source recorded, the refit mark gone."""
    manifest.source = dict(target.source)
    write_manifest(bundle, manifest)


__all__ = ["PARITY_BOUND", "RefitTarget", "begin", "check_refittable", "finish", "parity_check", "refit_cond",
           "refit_graphs", "refit_target"]
