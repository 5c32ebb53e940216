"""`r2r-export onnx`: the ONNX bundle of a model. The `r2r-export` group itself, with `build-engines`, is
`r2r.engines.cli` (engines come after export in the flow)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from r2r.checkpoints import model_option
from r2r.config import DEFAULT_TAC_DIVISOR
from r2r.log import log
from r2r.lora import LoraSpec, fuse_loras, lora_option
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, ModelLoadError, default_resolution, with_token

if TYPE_CHECKING:
    from r2r.export.bundle import ExportConfig


def export_config(model: Path | None, embedding: Path | None, out: Path, width: int | None, height: int | None,
                  batch_max: int, tac_divisor: int, min_side: int | None = None, max_side: int | None = None,
                  static: bool = False, lora: list[LoraSpec] | None = None, refit: bool = False,
                  token: str | None = None) -> ExportConfig:
    from r2r.export.bundle import DEFAULT_MAX_SIDE, ExportConfig

    try:
        model_dir = fuse_loras(model or EMBEDDED_DEFAULT, lora or [])
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    dw, dh = default_resolution(model_dir)
    w, h = width or dw, height or dh
    if w % 8 or h % 8:
        raise click.BadParameter(f"--width/--height must be multiples of 8, got {w}x{h}")
    if batch_max < 1:
        raise click.BadParameter("--batch-max must be >= 1")
    embedding = embedding_for(model_dir, embedding, token)
    return ExportConfig(model_dir, embedding, out, w, h, batch_max, tac_divisor,
                        min_side=min_side, max_side=max_side or DEFAULT_MAX_SIDE, static=static, refit=refit)


REFIT_HELP = ("Make the bundle refittable: record which model parameter each graph weight is, so that `r2r-export "
              "refit` can give it another model's weights (TensorRT: refittable engines).")


TOKEN_HELP = "The embedding's token [default: its own: the key of a diffusers file, the name of an A1111 one]."


def embedding_for(model_dir: Path, embedding: Path | None, token: str | None) -> Path:
    """The negative embedding a command uses: --embedding (default: the model's own), under --token if given."""
    path = embedding or model_dir / EMBEDDING_FILE
    if token is None:
        return path
    try:
        return with_token(path, token)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --embedding, --width, --height, --batch-max, --tac-divisor, --min-side, --max-side, --static: what a
    bundle is made from."""
    for opt in reversed([
        click.option("--model", type=click.Path(path_type=Path), default=None, callback=model_option,
                     help="SD 1.x: a diffusers directory or a single-file .safetensors checkpoint [default: the "
                          "embedded tiny model]."),
        click.option("--lora", multiple=True, callback=lora_option, metavar="FILE[:SCALE]",
                     help="A LoRA (.safetensors; diffusers/PEFT or kohya keys) fused into the model's UNet and text "
                          "encoder before export, at SCALE [default 1] (repeatable)."),
        click.option("--embedding", type=click.Path(path_type=Path), default=None,
                     help="Negative embedding .safetensors [default: MODEL/negative_embedding.safetensors]."),
        click.option("--token", default=None, help=TOKEN_HELP),
        click.option("--width", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--height", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--batch-max", type=int, default=4, show_default=True, help="Largest batch of images."),
        click.option("--tac-divisor", type=int, default=DEFAULT_TAC_DIVISOR, show_default=True),
        click.option("--min-side", type=int, default=None,
                     help="Smallest image side the graphs take [default: two of the model's pixel multiples, 64 "
                          "for SD 1.5]."),
        click.option("--max-side", type=int, default=None, help="Largest image side the graphs take [default: 2048]."),
        click.option("--static", is_flag=True,
                     help="Graphs of --width x --height only (TensorRT builds static-size engines from them)."),
    ]):
        f = opt(f)
    return f


def export(cfg: ExportConfig) -> None:
    """Write or refresh the bundle, a model error (or one that cannot be made refittable) reported as a CLI
    error."""
    from r2r.export.bundle import export_bundle
    from r2r.export.weight_map import RefitError

    try:
        export_bundle(cfg)
    except (ModelLoadError, RefitError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("onnx")
@model_options
@click.option("--refit", is_flag=True, help=REFIT_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
def onnx_cmd(model, lora, embedding, token, width, height, batch_max, tac_divisor, min_side, max_side, static,
             refit: bool, out: Path) -> None:
    """Write the ONNX bundle: UNet variants, VAE graphs, conditioning, manifest."""
    cfg = export_config(model, embedding, out, width, height, batch_max, tac_divisor, min_side, max_side, static,
                        lora, refit, token)
    sides = "static" if static else f"sides {cfg.min_side or 'auto'}..{cfg.max_side}"
    log(f"r2r-export onnx: {cfg.model} at {cfg.width}x{cfg.height} ({sides}), batch 1-{cfg.batch_max} -> {out}")
    export(cfg)
