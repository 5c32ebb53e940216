"""`r2r-export`: export's `onnx` command and `build-engines`, which builds a backend's engines from a bundle.

The backend table (`r2r/backends.py`) says which backends, devices and precisions there are and which module
builds each; a flag that only one backend takes is refused for the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from r2r.backends import DEVICES, NAMES, PRECISIONS, BuildRequest, backend_row
from r2r.export.cli import export, export_config, model_options, onnx_cmd
from r2r.log import log

TENSORRT_ONLY = {"opt_level": "--opt-level", "refit": "--refit"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export FashionR2R's graphs and build engines from them."""


main.add_command(onnx_cmd)


@main.command("build-engines")
@click.option("--backend", type=click.Choice(NAMES), default="onnxruntime", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="[default: fp32; checked against the backend]")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="onnxruntime: the execution provider [default: cpu; tensorrt: cuda; openvino: cpu].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--refit", is_flag=True, help="TensorRT: build refittable engines.")
@model_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.pass_context
def build_engines_cmd(ctx: click.Context, backend: str, precision: str | None, device: str | None, opt_level: int,
                      refit: bool, model, embedding, width, height, batch_max, tac_divisor, out: Path) -> None:
    """Build engines for one backend and precision (exports the ONNX bundle first if needed)."""
    row = backend_row(backend)
    given = [flag for name, flag in TENSORRT_ONLY.items()
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given and backend != "tensorrt":
        raise click.UsageError(f"{', '.join(given)}: TensorRT build options; --backend {backend} takes neither")
    try:
        precision = row.check_precision(precision or "fp32")
        device = row.check_device(device or ("cpu" if "cpu" in row.devices else row.devices[0]))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    cfg = export_config(model, embedding, out, width, height, batch_max, tac_divisor)
    log(f"r2r-export build-engines: checking the ONNX bundle {out}")
    export(cfg)
    log(f"r2r-export build-engines: {backend} {precision} on {device}")
    request = BuildRequest(precision=precision, device=device, batches=tuple(sorted({1, batch_max})),
                           opt_level=opt_level, refit=refit)
    try:
        importlib.import_module(row.builder).build(out, request)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
