"""`r2r-run`: translate rendered images into realistic photos; a shell over `r2r.Translator` (runtime/translator.py).

The flags become the Translator's parameters (the model source and the method as one typed value each, r2r/options.py);
`translate_files` does the work; this module prints its progress and summary and sets the exit code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from r2r import storage
from r2r.backends import NAMES, PRECISIONS
from r2r.config import INVERSIONS, Inversion, Method
from r2r.errors import R2RError
from r2r.imageio import ImageReadError, collect_inputs
from r2r.log import log
from r2r.options import method_options, model_source_options, threads_option
from r2r.prompts import PromptError, PromptTable
from r2r.runtime.assembly import REFERENCE, FusedChoice, RunConfig, prepare_run
from r2r.runtime.translator import Progress, RunSummary, Translator, run_config
from r2r.sizing import FITS, Fit
from r2r.source import ModelSource

F = TypeVar("F", bound=Callable[..., Any])


def translator_options(f: F) -> F:
    """What opens a Translator, the flags `r2r-run` and `r2r-serve` share: the bundle or model, backend, size and fit,
    the method, inversion, precision and device."""
    for opt in reversed([
        click.option("--engine", type=click.Path(path_type=Path), default=None,
                     help="Bundle from `r2r-export` [default: --model's bundle, exported once into the cache]."),
        click.option("--backend", type=click.Choice(("auto", *NAMES, REFERENCE)), default="auto", show_default=True,
                     help="auto: the fastest here (tensorrt, onnxruntime's CUDA provider or torch on a GPU; "
                          "openvino, else onnxruntime on a CPU); torch: the coupled scheduler on --model's PyTorch "
                          "modules (CUDA graphs on a GPU); reference: the PyTorch reference (the oracle) on --model."),
        model_source_options,
        click.option("--width", type=int, default=None,
                     help="Without --engine: the bundle's native size (the pixel budget) [default: the model's own]"),
        click.option("--height", type=int, default=None,
                     help="Without --engine: the bundle's native size (the pixel budget) [default: the model's own]"),
        click.option("--fit", type=click.Choice(FITS), default="pad", show_default=True,
                     help="An input the bundle does not take as it is: pad (scaled to the pixel budget, aspect kept, "
                          "padded to the bundle's multiple; output at the input's size), crop (center-cropped to the "
                          "multiple instead) or stretch (resized to the native size, aspect ignored; output at that "
                          "size)."),
        click.option("--max-pixels", type=click.IntRange(min=4096), default=None,
                     help="Pixel budget: larger inputs are scaled down to it [default: the native area; an input the "
                          "bundle takes as it is runs at its own size]."),
        method_options,
        click.option("--inversion", type=click.Choice(INVERSIONS), default="exact", show_default=True,
                     help="single-pass: 46 instead of 58 UNet evaluations, another epsilon convention (measure "
                          "first)."),
        click.option("--fused", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Bundles: the TAC step as one routed UNet call on [cg, neg, null] (on) or unet_emit + "
                          "unet_inject (off: two more UNet graphs loaded); auto: on with exact inversion, off with "
                          "single-pass."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="[default: the backend's: fp32 on CPU, the best the bundle's TensorRT engines were built "
                          "with]"),
        click.option("--device", default="auto", show_default=True,
                     help="Bundle backends: auto, cpu or cuda (checked against the backend; onnxruntime on cuda runs "
                          "device-resident buffers and CUDA graphs). reference: a torch device [auto = cpu]."),
    ]):
        f = opt(f)
    return f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "inputs", multiple=True, metavar="PATH...",
              help="Images, folders, globs or .txt lists of paths (repeatable; more may follow as arguments); or "
                   "fsspec URLs of the same (s3://, gs://, ... with the filesystem's package installed).")
@click.argument("more_inputs", nargs=-1, metavar="[PATH]...")
@click.option("--output", "output_text", required=True,
              help="Output folder: a path, or an fsspec URL (s3://bucket/out/, ...).")
@translator_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt", default=None, metavar="TEXT",
              help="A prompt for every input, at --text-guidance (docs/design.md, \"Prompts\"); at most 77 tokens "
                   "(longer is cut, with a warning).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE",
              help="Each input's own prompt: a metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line, "
                   "file_name relative to the file's folder, as an r2r dataset and diffusers' ImageFolder write it); "
                   "an input without a record has none.")
@threads_option(help="CPU threads per backend session (0: all cores); several runs on one machine split them.")
@click.option("--resume", is_flag=True, help="Skip inputs whose output exists, is complete and has these parameters.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Translate on a Ray cluster (pip install 'r2r[ray]'): local (one here, for the run), auto (join "
                   "RAY_ADDRESS) or ray://host:port. The bundle and --output must be paths every node sees "
                   "(docs/scale-out.md); OUTPUT/results.jsonl records every input.")
@click.option("--actors", default=None, metavar="N|MIN:MAX",
              help="With --ray: translating actors, a fixed pool or autoscaling [default: the CPUs / --threads; "
                   "one per GPU with --device cuda].")
def main(inputs: tuple[str, ...], more_inputs: tuple[str, ...], output_text: str, engine: Path | None, backend: str,
         source: ModelSource, width: int | None, height: int | None, fit: str, max_pixels: int | None,
         method: Method, inversion: str, fused: str, precision: str | None, batch_size: int, prompt: str | None,
         prompts_file: Path | None, threads: int, resume: bool, ray_address: str | None, actors: str | None,
         device: str) -> None:
    """Translate rendered images into realistic photos (FashionR2R), one PNG per input."""
    specs = list(inputs) + list(more_inputs)
    if not specs:
        raise click.UsageError("no input: pass --input PATH (files, folders, globs or a .txt list)")
    if actors is not None and ray_address is None:
        raise click.UsageError("--actors: only with --ray")
    prompts = _prompts(prompt, prompts_file, method, ray_address)
    try:  # what cannot run fails here, before anything is converted, exported or loaded
        paths = collect_inputs(specs)
        output = storage.location(output_text)
        if storage.is_url(output):
            storage.filesystem(str(output))
    except (ImageReadError, storage.StorageError) as exc:
        raise click.UsageError(str(exc)) from exc
    if not paths:
        raise click.UsageError(f"no image found in {', '.join(specs)}")
    threads = threads or (1 if ray_address is not None else 0)  # each Ray actor's; the driver tries the same
    try:
        cfg = run_config(source, engine, backend, precision, device, batch_size, threads, cast(Fit, fit), max_pixels,
                         method, cast(Inversion, inversion), cast(FusedChoice, fused), width, height)
        if ray_address is not None:
            sys.exit(_run_on_ray(cfg, paths, output, resume, ray_address, actors))
        with Translator.from_config(cfg) as translator:
            summary = _translate(translator, [str(p) for p in paths], output_text, resume, prompts)
    except (R2RError, ImportError) as exc:  # ImportError: an optional package a flag needs (Ray, a filesystem)
        raise click.ClickException(str(exc)) from exc
    log(summary.line(output))
    for r in summary.failed:
        log(f"  failed: {r.input}: {r.error}")
    if summary.failed:
        sys.exit(1)


def _prompts(prompt: str | None, prompts_file: Path | None, method: Method,
             ray_address: str | None) -> str | PromptTable | None:
    """--prompt / --prompts, read and checked before any work."""
    if prompt is not None and prompts_file is not None:
        raise click.UsageError("--prompt and --prompts: give one (a prompt for all inputs, or a file of each one's)")
    if prompt is None and prompts_file is None:
        return None
    if ray_address is not None:
        raise click.UsageError("--prompt/--prompts: not with --ray yet; run without --ray")
    try:
        given: str | PromptTable = PromptTable.read(prompts_file) if prompts_file is not None else str(prompt)
    except PromptError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts" if prompts_file else "--prompt") from exc
    if method.text_guidance == 0:
        log("r2r-run: a prompt has no effect at --text-guidance 0 (the default: the paper's program); pass "
            "--text-guidance W (e.g. 3) to use it")
    return given


def _translate(translator: Translator, paths: list[str], output: str, resume: bool,
               prompts: str | PromptTable | None = None) -> RunSummary:
    """`translate_files` with a progress bar in images/s."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", desc="r2r-run", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()

    def on(event: Progress) -> None:
        if event.kind == "image":
            bar.update(1)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{event.done / elapsed:.2f} img/s" if elapsed > 0 else "")

    try:
        return translator.translate_files(paths, output, resume, progress=on, prompts=prompts)
    finally:
        bar.close()


def _run_on_ray(cfg: RunConfig, paths: list[storage.Location], output: storage.Location, resume: bool, address: str,
                actors: str | None) -> int:
    """`--ray`: prepare the run here once (bundle, engines, the first-use check with the actors' threads), then
    translate on the cluster's actors."""
    from r2r.runtime import ray_run

    if cfg.backend == REFERENCE:
        raise click.UsageError("--ray runs a bundle backend; the PyTorch reference runs in one process")
    ray_run.import_ray()
    prepared = prepare_run(cfg)
    gpus = 1.0 if prepared.device == "cuda" else 0.0
    try:
        lo, hi = ray_run.parse_actors(actors) if actors else (None, None)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    ray_cfg = ray_run.RayConfig(address, lo, hi, cfg.threads, gpus)
    return ray_run.run_cli(prepared, cfg, paths, output, ray_cfg, resume)
