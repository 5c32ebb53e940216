"""`r2r-export`: ONNX bundles (`onnx`) and engines built from them (`build-engines`)."""

from __future__ import annotations

from pathlib import Path

import click

from r2r.config import DEFAULT_TAC_DIVISOR
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, ModelLoadError, default_resolution


def _export_config(model: Path | None, embedding: Path | None, out: Path, width: int | None, height: int | None,
                   batch_max: int, tac_divisor: int):
    from r2r.export.bundle import ExportConfig

    model_dir = model or EMBEDDED_DEFAULT
    dw, dh = default_resolution(model_dir)
    w, h = width or dw, height or dh
    if w % 8 or h % 8:
        raise click.BadParameter(f"--width/--height must be multiples of 8, got {w}x{h}")
    if batch_max < 1:
        raise click.BadParameter("--batch-max must be >= 1")
    return ExportConfig(model_dir, embedding or model_dir / EMBEDDING_FILE, out, w, h, batch_max, tac_divisor)


def _model_options(f):
    for opt in reversed([
        click.option("--model", type=click.Path(path_type=Path), default=None,
                     help="Diffusers SD 1.x directory [default: the embedded tiny model]."),
        click.option("--embedding", type=click.Path(path_type=Path), default=None,
                     help="Negative embedding .safetensors [default: MODEL/negative_embedding.safetensors]."),
        click.option("--width", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--height", type=int, default=None, help="[default: the model's own resolution]"),
        click.option("--batch-max", type=int, default=4, show_default=True, help="Largest batch of images."),
        click.option("--tac-divisor", type=int, default=DEFAULT_TAC_DIVISOR, show_default=True),
    ]):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export FashionR2R's graphs and build engines from them."""


@main.command("onnx")
@_model_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
def onnx_cmd(model, embedding, width, height, batch_max, tac_divisor, out: Path) -> None:
    """Write the ONNX bundle: UNet variants, VAE graphs, conditioning, manifest."""
    from r2r.export.bundle import export_bundle

    cfg = _export_config(model, embedding, out, width, height, batch_max, tac_divisor)
    click.echo(f"r2r-export onnx: {cfg.model} at {cfg.width}x{cfg.height}, batch 1-{cfg.batch_max} -> {out}", err=True)
    try:
        export_bundle(cfg)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("build-engines")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]), default="onnxruntime",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "fp8"]), default="fp32",
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--refit", is_flag=True, help="TensorRT: build refittable engines.")
@_model_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
def build_engines_cmd(backend, precision, device, opt_level, refit, model, embedding, width, height, batch_max,
                      tac_divisor, out: Path) -> None:
    """Build engines for one backend and precision (exports the ONNX bundle first if needed)."""
    from r2r.export.bundle import export_bundle

    cfg = _export_config(model, embedding, out, width, height, batch_max, tac_divisor)
    click.echo(f"r2r-export build-engines: checking the ONNX bundle {out}", err=True)
    try:
        export_bundle(cfg)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"r2r-export build-engines: {backend} {precision}", err=True)
    if backend == "onnxruntime":
        from r2r.engines.onnxruntime import build_ort_engines

        try:
            build_ort_engines(out, precision=precision, device=device)
        except (ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from exc
    elif backend == "openvino":
        from r2r.engines.openvino import build_ov_engines

        try:
            build_ov_engines(out, precision=precision, batches=sorted({1, batch_max}))
        except (ImportError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        from r2r.engines.tensorrt import TrtBuildConfig, build_bundle_engines

        try:
            build_bundle_engines(out, TrtBuildConfig(precision=precision, builder_optimization_level=opt_level,
                                                     refit=refit))
        except (ImportError, RuntimeError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
