"""`r2r-export onnx`: the ONNX bundle of a model. The `r2r-export` group itself, with `build-engines`, is
`r2r.engines.cli` (engines come after export in the flow)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from r2r import graph_io
from r2r.config import ATTENTION_POOLS, DEFAULT_TAC_DIVISOR
from r2r.log import log
from r2r.models import default_resolution, model_defaults
from r2r.options import grouped, model_source_options, resolve_source
from r2r.source import ModelSource

if TYPE_CHECKING:
    from r2r.export.bundle_writer import ExportConfig

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class BundleShape:
    """How a bundle is shaped, as given: its example size (None: the model's own), batch range, TAC divisor, the
    sizes its graphs take (`--static`: the example size only) and the attention pool its UNet graphs are made with."""

    width: int | None = None
    height: int | None = None
    batch_max: int = 4
    tac_divisor: int = DEFAULT_TAC_DIVISOR
    min_side: int | None = None
    max_side: int | None = None
    static: bool = False
    attention_pool: int = 1


def bundle_options(f: F) -> F:
    """--width, --height, --batch-max, --tac-divisor, --min-side, --max-side, --static, --attention-pool, handed to
    the command as `shape: BundleShape`."""
    wrapper = grouped(f, tuple(fl.name for fl in fields(BundleShape)), "shape", BundleShape)
    for opt in reversed([
        click.option("--width", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--height", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--batch-max", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Largest batch of images."),
        click.option("--tac-divisor", type=click.IntRange(min=1), default=DEFAULT_TAC_DIVISOR, show_default=True),
        click.option("--min-side", type=int, default=None,
                     help="Smallest image side the graphs take [default: two of the model's pixel multiples, 64 "
                          "for SD 1.5]."),
        click.option("--max-side", type=int, default=None, help="Largest image side the graphs take [default: 2048]."),
        click.option("--static", is_flag=True,
                     help="Graphs of --width x --height only (TensorRT builds static-size engines from them)."),
        click.option("--attention-pool", type=click.Choice([str(p) for p in ATTENTION_POOLS]), default="1",
                     show_default=True, callback=lambda ctx, param, v: int(v),
                     help="UNet graphs whose first-level self-attention takes keys and values from the token grid "
                          "pooled F x F (F**2 less attention work; an approximation of the method)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper  # type: ignore[return-value]


def export_config(source: ModelSource, shape: BundleShape, out: Path, refit: bool = False) -> ExportConfig:
    """What `r2r-export` exports: the source resolved (once), the shape checked."""
    from r2r.export.bundle_writer import DEFAULT_MAX_SIDE, ExportConfig

    resolved = resolve_source(source)
    dw, dh = default_resolution(resolved.model)
    w, h = shape.width or dw, shape.height or dh
    if w % 8 or h % 8:
        raise click.BadParameter(f"--width/--height must be multiples of 8, got {w}x{h}")
    return ExportConfig(resolved.model, resolved.embedding, out, w, h, shape.batch_max, shape.tac_divisor,
                        min_side=shape.min_side, max_side=shape.max_side or DEFAULT_MAX_SIDE, static=shape.static,
                        refit=refit, attention_pool=shape.attention_pool)


REFIT_HELP = ("Make the bundle refittable: record which model parameter each graph weight is, so that `r2r-export "
              "refit` can give it another model's weights (TensorRT: refittable engines).")


def bundle_graphs(model: Path, named: tuple[str, ...] = (), step_cache: bool = False) -> tuple[str, ...]:
    """The graphs `r2r-export onnx` writes: those named, else the default ones; the step-cache pair too with
    --step-cache, or where no graph is named and the model's defaults step-cache (its bundle runs r2r-run's default
    program)."""
    step_cache = step_cache or (not named and model_defaults(model).cache_interval > 1)
    wanted = set(named or graph_io.DEFAULT_GRAPHS) | (set(graph_io.STEP_CACHE_GRAPHS) if step_cache else set())
    return tuple(g for g in graph_io.ALL_GRAPHS if g in wanted)


def export(cfg: ExportConfig) -> None:
    """Write or refresh the bundle, a model error (or one that cannot be made refittable) reported as a CLI
    error."""
    from r2r.export.bundle_writer import export_bundle
    from r2r.export.weight_map import RefitError
    from r2r.models import ModelLoadError

    try:
        export_bundle(cfg)
    except (ModelLoadError, RefitError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("onnx")
@model_source_options
@bundle_options
@click.option("--refit", is_flag=True, help=REFIT_HELP)
@click.option("--graph", "graphs", multiple=True, type=click.Choice(graph_io.ALL_GRAPHS),
              help="Only this graph (repeatable): the bundle holds these alone [default: every graph but the "
                   "step-cache pair, which comes too where the model's defaults step-cache]. The default (fused) "
                   "program calls unet, vae_encoder, vae_decoder and, on a GPU, ddim_step and guided_step; "
                   "--fused off and --inversion single-pass also call unet_emit and unet_inject; --cache-interval "
                   "K > 1 calls unet_deep and unet_shallow in place of unet.")
@click.option("--step-cache", is_flag=True,
              help="Also export the step-cache graphs unet_deep and unet_shallow, which `r2r-run --cache-interval K` "
                   "(K > 1) runs [default: where the model's r2r_defaults.json sets cache_interval, the embedded "
                   "default's 3].")
@click.option("--text-encoder/--no-text-encoder", default=True, show_default=True,
              help="The model's text encoder (fp32 graph) and tokenizer beside the graphs, which `r2r-run --prompt` "
                   "and `--prompts` need (docs/design.md, \"Prompts\").")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
def onnx_cmd(source: ModelSource, shape: BundleShape, refit: bool, graphs: tuple[str, ...], step_cache: bool,
             text_encoder: bool, out: Path) -> None:
    """Write the ONNX bundle: UNet variants, VAE graphs, conditioning, text encoder, manifest."""
    cfg = export_config(source, shape, out, refit)
    cfg = replace(cfg, graphs=bundle_graphs(cfg.model, graphs, step_cache), text_encoder=text_encoder)
    sides = "static" if shape.static else f"sides {cfg.min_side or 'auto'}..{cfg.max_side}"
    log(f"r2r-export onnx: {cfg.model} at {cfg.width}x{cfg.height} ({sides}), batch 1-{cfg.batch_max} -> {out}")
    export(cfg)
