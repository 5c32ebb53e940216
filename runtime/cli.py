"""`r2r-run`: translate rendered images into realistic photos, from a bundle or the reference."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import click
import numpy as np

from r2r import storage
from r2r.backends import DEVICES, NAMES, PRECISIONS
from r2r.checkpoints import model_option
from r2r.config import INVERSIONS, Inversion, MethodConfig
from r2r.export.cli import TOKEN_HELP, embedding_for
from r2r.imageio import ImageReadError, collect_inputs, load_rgb, output_path_for
from r2r.log import log
from r2r.lora import LoraSpec, fuse_loras, lora_option
from r2r.manifest import BundleError
from r2r.models import EMBEDDED_DEFAULT, ModelLoadError
from r2r.runtime.assembly import REFERENCE, FusedChoice, RunConfig, Runtime, open_runtime, prepare_run
from r2r.runtime.outputs import is_complete, write_output
from r2r.runtime.scheduler import DegenerateOutput
from r2r.runtime.trial import TrialFailed
from r2r.runtime.verify import EngineRejected
from r2r.sizing import FITS, Fit, Placement, group_by_size, prepare, restore
from r2r.storage import Location

METHOD_FLAGS = ("steps", "strength", "guidance", "tac_ratio", "tac_divisor", "tac_target")
# Flags that only one kind of run takes: given with the other, r2r-run refuses them by name instead of ignoring them.
BUNDLE_ONLY = {"engine": "--engine", "fused": "--fused"}
WITHOUT_ENGINE = {"width": "--width", "height": "--height", "model": "--model", "lora": "--lora",
                  "embedding": "--embedding", "token": "--token"}


def stream_batches(paths: list[Location], runtime: Runtime, batch_size: int,
                   run: Callable[[list[tuple[Location, np.ndarray, Placement]]], None], pending_max: int = 0
                   ) -> Iterator[tuple[Location, str]]:
    """Read `paths` in order, place each at its run size, and call `run` on batches of one run size
    (`group_by_size`: full batches as soon as they are, a folder of mixed sizes in bounded memory). Yields (path, why)
    for each input that cannot be read, as it is met."""
    failed: list[tuple[Location, str]] = []

    def decoded() -> Iterator[tuple[Location, np.ndarray, Placement]]:
        for p in paths:
            try:
                img = load_rgb(p)
            except ImageReadError as exc:
                failed.append((p, str(exc)))
                continue
            placement = runtime.place(img.shape[1], img.shape[0])
            yield p, prepare(img, placement), placement

    for batch in group_by_size(decoded(), lambda item: item[2].run, batch_size, pending_max):
        yield from failed
        failed.clear()
        run(batch)
    yield from failed


def translate_batch(runtime: Callable[[list[np.ndarray]], list[np.ndarray]],
                    batch: list[tuple[Location, np.ndarray, Placement]], output: Location,
                    params: dict) -> tuple[int, list[str]]:
    """Translate one batch and write each image the runtime delivers (an image it refuses as non-finite or
    degenerate is a failure with the reason, never a PNG): (images written, failures as "input: why")."""
    status: dict[int, str] = {}  # index -> "" (written) or why it failed
    try:
        try:
            outs: list[np.ndarray | None] = list(runtime([img for _, img, _ in batch]))
        except DegenerateOutput as exc:  # the batch's other images are delivered
            outs = exc.outputs
            status |= {i: f"not delivered: {why}" for i, why in exc.problems.items()}
        for i, ((p, _, placement), img) in enumerate(zip(batch, outs, strict=True)):
            if img is not None:
                write_output(output_path_for(p, output), restore(img, placement), params, storage.name_of(p))
                status[i] = ""
    except (RuntimeError, ValueError, OSError) as exc:
        status |= {i: str(exc) for i in range(len(batch)) if i not in status}
    return (sum(1 for why in status.values() if not why),
            [f"{batch[i][0]}: {why}" for i, why in sorted(status.items()) if why])


def _given(ctx: click.Context, names: dict[str, str]) -> list[str]:
    """The flags among `names` that the user typed (not defaults)."""
    return [flag for name, flag in names.items()
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]


def _check_flags(ctx: click.Context, backend: str, engine: Path | None, precision: str | None, device: str) -> None:
    """Refuse, by name and with the fix, every flag that does not apply to this kind of run."""
    if backend == REFERENCE:
        bad = _given(ctx, BUNDLE_ONLY)
        if bad:
            raise click.UsageError(f"{', '.join(bad)}: the PyTorch reference runs the model itself, not a bundle; "
                                   "drop it, or choose a bundle backend with --backend")
        if precision not in (None, "fp32"):
            raise click.UsageError(f"--precision {precision}: the PyTorch reference runs fp32 only")
        return
    if engine is not None:
        bad = _given(ctx, WITHOUT_ENGINE)
        if bad:
            raise click.UsageError(f"{', '.join(bad)}: the bundle {engine} was exported from its own model, size and "
                                   "embedding; drop --engine to translate with this model's bundle (exported once "
                                   "into the cache), or export one with `r2r-export onnx`")
    if device not in ("auto", *DEVICES):
        raise click.UsageError(f"--device {device}: bundle backends take auto, {', '.join(DEVICES)}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "inputs", multiple=True, metavar="PATH...",
              help="Images, folders, globs or .txt lists of paths (repeatable; more may follow as arguments); or "
                   "fsspec URLs of the same (s3://, gs://, ... with the filesystem's package installed).")
@click.argument("more_inputs", nargs=-1, metavar="[PATH]...")
@click.option("--output", "output_text", required=True,
              help="Output folder: a path, or an fsspec URL (s3://bucket/out/, ...).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Bundle from `r2r-export` [default: --model's bundle, exported once into the cache].")
@click.option("--backend", type=click.Choice(("auto", *NAMES, REFERENCE)), default="auto", show_default=True,
              help="auto: the fastest here (tensorrt, onnxruntime's CUDA provider or torch on a GPU; openvino, else "
                   "onnxruntime on a CPU); torch: the coupled scheduler on --model's PyTorch modules (CUDA graphs on "
                   "a GPU); reference: the PyTorch reference (the oracle) on --model.")
@click.option("--model", type=click.Path(path_type=Path), default=None, callback=model_option,
              help="SD 1.x: a diffusers directory or a single-file .safetensors checkpoint [default: the embedded "
                   "tiny model].")
@click.option("--lora", multiple=True, callback=lora_option, metavar="FILE[:SCALE]",
              help="A LoRA (.safetensors; diffusers/PEFT or kohya keys) fused into --model before it is exported or "
                   "run, at SCALE [default 1] (repeatable).")
@click.option("--embedding", type=click.Path(path_type=Path), default=None,
              help="Negative embedding [default: MODEL/negative_embedding.safetensors].")
@click.option("--token", default=None, help=TOKEN_HELP)
@click.option("--width", type=int, default=None,
              help="Without --engine: the bundle's native size (the pixel budget) [default: the model's own]")
@click.option("--height", type=int, default=None,
              help="Without --engine: the bundle's native size (the pixel budget) [default: the model's own]")
@click.option("--fit", type=click.Choice(FITS), default="pad", show_default=True,
              help="An input the bundle does not take as it is: pad (scaled to the pixel budget, aspect kept, padded "
                   "to the bundle's multiple; output at the input's size), crop (center-cropped to the multiple "
                   "instead) or stretch (resized to the native size, aspect ignored; output at that size).")
@click.option("--max-pixels", type=click.IntRange(min=4096), default=None,
              help="Pixel budget: larger inputs are scaled down to it [default: the native area; an input the "
                   "bundle takes as it is runs at its own size].")
@click.option("--steps", type=int, default=None, help="[default: the bundle's, 50]")
@click.option("--strength", type=float, default=None, help="[default: the bundle's, 0.3]")
@click.option("--guidance", type=float, default=None, help="[default: the bundle's, 7.5]")
@click.option("--tac-ratio", type=float, default=None, help="[default: the bundle's, 0.9]")
@click.option("--tac-divisor", type=int, default=None,
              help="[default: the bundle's, 256; without --engine the cached bundle is exported with it]")
@click.option("--tac-target", type=click.Choice(["null", "both"]), default=None,
              help="--backend reference only: which guidance pass TAC controls [default: null].")
@click.option("--inversion", type=click.Choice(INVERSIONS), default="exact", show_default=True,
              help="single-pass: 46 instead of 58 UNet evaluations, another epsilon convention (measure first).")
@click.option("--fused", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Bundles: the TAC step as one routed UNet call on [cg, neg, null] (on) or unet_emit + unet_inject "
                   "(off: two more UNet graphs loaded); auto: on with exact inversion, off with single-pass.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="[default: the backend's: fp32 on CPU, the best the bundle's TensorRT engines were built with]")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="CPU threads per backend session (0: all cores); several runs on one machine split them.")
@click.option("--resume", is_flag=True, help="Skip inputs whose output exists, is complete and has these parameters.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Translate on a Ray cluster (pip install 'r2r[ray]'): local (one here, for the run), auto (join "
                   "RAY_ADDRESS) or ray://host:port. The bundle and --output must be paths every node sees "
                   "(docs/scale-out.md); OUTPUT/results.jsonl records every input.")
@click.option("--actors", default=None, metavar="N|MIN:MAX",
              help="With --ray: translating actors, a fixed pool or autoscaling [default: the CPUs / --threads; "
                   "one per GPU with --device cuda].")
@click.option("--device", default="auto", show_default=True,
              help="Bundle backends: auto, cpu or cuda (checked against the backend; onnxruntime on cuda runs "
                   "device-resident buffers and CUDA graphs). reference: a torch device [auto = cpu].")
@click.pass_context
def main(ctx: click.Context, inputs: tuple[str, ...], more_inputs: tuple[str, ...], output_text: str,
         engine: Path | None, backend: str, model: Path | None, lora: list[LoraSpec], embedding: Path | None,
         token: str | None, width: int | None, height: int | None, fit: str, max_pixels: int | None, steps: int | None,
         strength: float | None, guidance: float | None, tac_ratio: float | None, tac_divisor: int | None,
         tac_target: str | None, inversion: str, fused: str,
         precision: str | None, batch_size: int, threads: int, resume: bool, ray_address: str | None,
         actors: str | None, device: str) -> None:
    """Translate rendered images into realistic photos (FashionR2R), one PNG per input."""
    from tqdm import tqdm

    specs = list(inputs) + list(more_inputs)
    if not specs:
        raise click.UsageError("no input: pass --input PATH (files, folders, globs or a .txt list)")
    if batch_size < 1:
        raise click.BadParameter("--batch-size must be >= 1")
    _check_flags(ctx, backend, engine, precision, device)
    if backend == "torch":
        log("r2r-run: --backend torch now runs the PyTorch backend of the coupled scheduler (the bundle's program "
            "on the model's modules); the PyTorch reference it ran before is --backend reference")
    try:
        paths = collect_inputs(specs)
        output = storage.location(output_text)
        if storage.is_url(output):
            storage.filesystem(str(output))  # a missing filesystem package fails here, before any work
    except (ImageReadError, storage.StorageError) as exc:
        raise click.UsageError(str(exc)) from exc
    if not paths:
        raise click.UsageError(f"no image found in {', '.join(specs)}")
    if lora:
        try:
            model = fuse_loras(model or EMBEDDED_DEFAULT, lora)
        except ModelLoadError as exc:
            raise click.ClickException(str(exc)) from exc
    if token is not None:
        embedding = embedding_for(model or EMBEDDED_DEFAULT, embedding, token)
    flags = dict(zip(METHOD_FLAGS, (steps, strength, guidance, tac_ratio, tac_divisor, tac_target), strict=True))
    cfg = RunConfig(engine=engine, model=model, embedding=embedding, width=width, height=height, backend=backend,
                    device=device, precision=precision, batch=batch_size, threads=threads,
                    method={k: v for k, v in flags.items() if v is not None}, inversion=cast(Inversion, inversion),
                    fused=cast(FusedChoice, fused), fit=cast(Fit, fit), max_pixels=max_pixels)
    if ray_address is not None:
        sys.exit(_run_on_ray(cfg, paths, output, resume, ray_address, actors))
    if actors is not None:
        raise click.UsageError("--actors: only with --ray")
    try:
        MethodConfig(**cfg.method)  # a bad flag fails before anything is exported or loaded
        runtime = open_runtime(cfg)
    except (ModelLoadError, BundleError, ValueError, ImportError, EngineRejected, TrialFailed) as exc:
        raise click.ClickException(str(exc)) from exc

    params = runtime.params
    storage.make_dirs(output)
    todo = [p for p in paths if not (resume and is_complete(output_path_for(p, output), params))]
    skipped = len(paths) - len(todo)
    failed: list[str] = []
    done = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="r2r-run", file=sys.stderr, dynamic_ncols=True)

    def run_batch(batch: list[tuple[Location, np.ndarray, Placement]]) -> None:
        nonlocal done
        written, why = translate_batch(runtime, batch, output, params)
        done += written
        failed.extend(why)
        bar.update(len(batch))
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{done / elapsed:.2f} img/s" if elapsed > 0 else "")

    for _, why in stream_batches(todo, runtime, batch_size, run_batch):
        failed.append(why)
        bar.update(1)
    bar.close()
    runtime.close()
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    log(f"r2r-run: {done} written, {skipped} skipped (complete), {len(failed)} failed in {elapsed:.1f} s "
        f"({rate:.2f} img/s; {runtime.describe()}, {runtime.evaluations():g} UNet evaluations per image) -> {output}")
    for why in failed:
        log(f"  failed: {why}")
    if failed:
        sys.exit(1)


def _run_on_ray(cfg: RunConfig, paths: list[Location], output: Location, resume: bool, address: str,
                actors: str | None) -> int:
    """`--ray`: prepare the run here once (bundle and engines), then translate on the cluster's actors."""
    from r2r.runtime import ray_run

    if cfg.backend == REFERENCE:
        raise click.UsageError("--ray runs a bundle backend; the PyTorch reference runs in one process")
    threads = cfg.threads or 1  # each actor's; the first-use check on the driver tries the actors' configuration
    cfg = replace(cfg, threads=threads)
    try:
        ray_run.import_ray()
        MethodConfig(**cfg.method)
        prepared = prepare_run(cfg)
    except (ModelLoadError, BundleError, ValueError, ImportError, EngineRejected, TrialFailed) as exc:
        raise click.ClickException(str(exc)) from exc
    gpus = 1.0 if prepared.device == "cuda" else 0.0
    try:
        lo, hi = ray_run.parse_actors(actors) if actors else (None, None)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    ray_cfg = ray_run.RayConfig(address, lo, hi, threads, gpus)
    return ray_run.run_cli(prepared, cfg, paths, output, ray_cfg, resume)
