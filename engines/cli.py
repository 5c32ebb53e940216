"""`r2r-export`: export's `onnx` command and `build-engines`, which builds a backend's engines from a bundle.

The backend table (`r2r/backends.py`) says which backends, devices and precisions there are and which module
builds each; a flag that only one backend takes is refused for the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from r2r.backends import DEVICES, NAMES, PRECISIONS, BuildRequest, auto_choices, backend_row, known_issue
from r2r.export.cli import REFIT_HELP, BundleShape, bundle_options, export, export_config, onnx_cmd
from r2r.log import log
from r2r.options import model_source_options, resolve_source
from r2r.source import ModelSource

TENSORRT_ONLY = {"opt_level": "--opt-level", "static_size": "--static-size"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export FashionR2R's graphs and build engines from them."""


main.add_command(onnx_cmd)


@main.command("build-engines")
@click.option("--backend", type=click.Choice(NAMES), default=None,
              help="[default: what `r2r-run` runs by default here: tensorrt on an NVIDIA GPU with TensorRT, else "
                   "onnxruntime's CUDA provider, else openvino]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="[default: tensorrt fp16; on the CPU the best precision it runs natively (openvino: bf16 with "
                   "AVX512-BF16 or AMX, else fp32)]")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="onnxruntime: the execution provider [default: the backend's first usable device].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--refit", is_flag=True, help=REFIT_HELP)
@click.option("--static-size", is_flag=True,
              help="TensorRT: engines of the bundle's example size only (faster than a range; others refused).")
@model_source_options
@bundle_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.pass_context
def build_engines_cmd(ctx: click.Context, backend: str, precision: str | None, device: str | None, opt_level: int,
                      refit: bool, static_size: bool, source: ModelSource, shape: BundleShape, out: Path) -> None:
    """Build engines for one backend and precision (exports the ONNX bundle first if needed)."""
    choices = [c for c in auto_choices(device or "auto") if c[0].builder]  # what r2r-run picks here, fastest first
    if backend is None:
        if not choices:
            raise click.UsageError(f"no backend runs on device {device} here; name one with --backend")
        row, default_device = choices[0]
    else:
        row = backend_row(backend)
        default_device = next((d for r, d in choices if r is row), row.devices[0])
    given = [flag for name, flag in TENSORRT_ONLY.items()
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given and row.name != "tensorrt":
        raise click.UsageError(f"{', '.join(given)}: TensorRT build options; --backend {row.name} takes neither")
    try:
        precision = row.check_precision(precision or (row.precisions[0] if row.needs_engines
                                                       else row.native_precision()))
        device = row.check_device(device or default_device)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if row.builder is None:
        raise click.UsageError(f"--backend {row.name} builds no engines: it runs the model's own modules")
    issue = known_issue(row.name, precision, not shape.static) if device == "cpu" else None
    if issue is not None:
        raise click.UsageError(f"{issue.describe()}")
    cfg = export_config(source, shape, out, refit)
    log(f"r2r-export build-engines: checking the ONNX bundle {out}")
    export(cfg)
    log(f"r2r-export build-engines: {row.name} {precision} on {device}")
    request = BuildRequest(precision=precision, device=device, opt_level=opt_level, refit=refit,
                           static_size=static_size, model=cfg.model,
                           embedding=cfg.embedding)
    try:
        importlib.import_module(row.builder).build(out, request)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("canary")
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="A bundle whose graphs have no canary yet (made before r2r checked its engines).")
def canary_cmd(bundle: Path) -> None:
    """Record each graph's canary (its outputs on fixed inputs, on ONNX Runtime fp32), which every backend's engines
    are checked against when they open; needs only the bundle."""
    from r2r.export.canary import record_graph_canaries
    from r2r.locks import bundle_lock
    from r2r.manifest import BundleError, read_manifest, write_manifest

    try:
        with bundle_lock(bundle):
            manifest = read_manifest(bundle)
            if not manifest.graphs:
                raise BundleError(f"{bundle}: no ONNX graph to record a canary of; export the bundle again with "
                                  "`r2r-export onnx`")
            made = record_graph_canaries(bundle, manifest)
            write_manifest(bundle, manifest)
    except (BundleError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    log(f"r2r-export canary: {len(made)} recorded, {len(manifest.canaries) - len(made)} up to date in {bundle}")


@main.command("refit")
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="A bundle exported (or built) with --refit.")
@model_source_options
def refit_cmd(bundle: Path, source: ModelSource) -> None:
    """Give a refittable bundle another model's weights (another LoRA, another finetune of the same architecture)
    without exporting or building again: its graphs, conditioning and TensorRT engines are refitted in place, the
    other backends' engines built again from the refitted graphs."""
    from r2r.engines.bundle_refit import refit_bundle

    resolved = resolve_source(source)  # the new model, of the bundle's architecture
    log(f"r2r-export refit: {bundle} -> {resolved.model}")
    try:
        report = refit_bundle(bundle, resolved.model, resolved.embedding)
    except (ImportError, RuntimeError, ValueError) as exc:  # RefitError, BundleError, TensorRT's errors
        raise click.ClickException(str(exc)) from exc
    changed = ", ".join(f"{g} {n}" for g, n in report.graphs.items()) or "none"
    log(f"r2r-export refit: done in {report.seconds:.1f} s (weights changed: {changed}; TensorRT engines refitted: "
        f"{len(report.tensorrt)}; engine builds redone: {len(report.rebuilt)})")
