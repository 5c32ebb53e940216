"""`r2r-run`: translate rendered images into realistic photos, from a bundle or the reference."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from r2r import __version__
from r2r.config import MethodConfig
from r2r.imageio import ImageReadError, collect_inputs, load_rgb, output_path_for, read_png_text, save_png
from r2r.manifest import MANIFEST, BundleError
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, ModelLoadError, default_resolution, sha256_file
from r2r.runtime.select import BACKENDS

PARAMS_KEY = "r2r:parameters"
Translate = Callable[[list[np.ndarray]], list[np.ndarray]]


def _method(bundle_defaults: MethodConfig | None, **flags: float | int | str | None) -> MethodConfig:
    base = (bundle_defaults or MethodConfig()).as_dict()
    return MethodConfig(**{**base, **{k: v for k, v in flags.items() if v is not None}})  # type: ignore[arg-type]


def _complete(path: Path, params: dict) -> bool:
    """An output counts as done if it decodes whole and was made with the same parameters."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
        old = json.loads(read_png_text(path).get(PARAMS_KEY, "{}"))
    except (OSError, ValueError):
        return False
    return {k: v for k, v in old.items() if k != "source"} == params


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "inputs", multiple=True, metavar="PATH...",
              help="Images, folders, globs or .txt lists of paths (repeatable; more may follow as arguments).")
@click.argument("more_inputs", nargs=-1, metavar="[PATH]...")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Bundle from `r2r-export` [default: the embedded default's, built once and cached].")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: tensorrt when the bundle has engines and TensorRT imports, else onnxruntime; "
                   "torch: the PyTorch reference on --model.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="--backend torch: diffusers SD 1.x directory [default: the embedded tiny model].")
@click.option("--embedding", type=click.Path(path_type=Path), default=None,
              help="--backend torch: negative embedding [default: MODEL/negative_embedding.safetensors].")
@click.option("--steps", type=int, default=None, help="[default: the bundle's, 50]")
@click.option("--strength", type=float, default=None, help="[default: the bundle's, 0.3]")
@click.option("--guidance", type=float, default=None, help="[default: the bundle's, 7.5]")
@click.option("--tac-ratio", type=float, default=None, help="[default: the bundle's, 0.9]")
@click.option("--tac-divisor", type=int, default=None, help="[default: the bundle's, 256]")
@click.option("--tac-target", type=click.Choice(["null", "both"]), default=None,
              help="--backend torch only: which guidance pass TAC controls [default: null].")
@click.option("--inversion", type=click.Choice(["exact", "single-pass"]), default="exact", show_default=True,
              help="single-pass: 46 instead of 58 UNet evaluations, another epsilon convention (measure first).")
@click.option("--fused", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Use unet_fused in the TAC window (auto: when the bundle has it and it measures faster).")
@click.option("--precision", default=None,
              help="Engine precision to load [default: fp32 on CPU, the bundle's TensorRT engines' on GPU].")
@click.option("--width", type=int, default=None, help="--backend torch: [default: the model's own resolution]")
@click.option("--height", type=int, default=None, help="--backend torch: [default: the model's own resolution]")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--resume", is_flag=True, help="Skip inputs whose output exists, is complete and has these parameters.")
@click.option("--device", default=None,
              help="torch: the torch device [cpu]; onnxruntime: auto, cpu or cuda (device-resident buffers and CUDA "
                   "graphs; auto: cuda when onnxruntime's CUDA provider is available) [auto].")
def main(inputs: tuple[str, ...], more_inputs: tuple[str, ...], output: Path, engine: Path | None, backend: str,
         model: Path | None, embedding: Path | None, steps: int | None, strength: float | None,
         guidance: float | None, tac_ratio: float | None, tac_divisor: int | None, tac_target: str | None,
         inversion: str, fused: str, precision: str | None, width: int | None, height: int | None, batch_size: int,
         resume: bool, device: str | None) -> None:
    """Translate rendered images into realistic photos (FashionR2R), one PNG per input."""
    from tqdm import tqdm

    specs = list(inputs) + list(more_inputs)
    if not specs:
        raise click.UsageError("no input: pass --input PATH (files, folders, globs or a .txt list)")
    if batch_size < 1:
        raise click.BadParameter("--batch-size must be >= 1")
    try:
        paths = collect_inputs(specs)
    except ImageReadError as exc:
        raise click.UsageError(str(exc)) from exc
    if not paths:
        raise click.UsageError(f"no image found in {', '.join(specs)}")
    flags = {"steps": steps, "strength": strength, "guidance": guidance, "tac_ratio": tac_ratio,
             "tac_divisor": tac_divisor, "tac_target": tac_target}
    try:
        translate, params, count = (
            _torch(model, embedding, width, height, device or "cpu", flags) if backend == "torch"
            else _bundle(engine, backend, precision, inversion, fused, batch_size, flags, device or "auto"))
    except (ModelLoadError, BundleError, ValueError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc

    output.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if not (resume and _complete(output_path_for(p, output), params))]
    skipped = len(paths) - len(todo)
    failed: list[str] = []
    done = 0
    size = (params["width"], params["height"])
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="r2r-run", file=sys.stderr, dynamic_ncols=True)
    for k in range(0, len(todo), batch_size):
        chunk, images = [], []
        for p in todo[k : k + batch_size]:
            try:
                images.append(load_rgb(p, size))
                chunk.append(p)
            except ImageReadError as exc:
                failed.append(str(exc))
                bar.update(1)
        if not chunk:
            continue
        try:
            outs = translate(images)
            for p, img in zip(chunk, outs, strict=True):
                text = {PARAMS_KEY: json.dumps({**params, "source": p.name}, sort_keys=True),
                        "Software": f"r2r {__version__}"}
                save_png(output_path_for(p, output), img, text)
                done += 1
        except (RuntimeError, ValueError, OSError) as exc:
            failed.extend(f"{p}: {exc}" for p in chunk)
        bar.update(len(chunk))
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{done / elapsed:.2f} img/s" if elapsed > 0 else "")
    bar.close()
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    click.echo(f"r2r-run: {done} written, {skipped} skipped (complete), {len(failed)} failed in {elapsed:.1f} s "
               f"({rate:.2f} img/s; {params['backend']}, {count()} UNet evaluations per image) -> {output}", err=True)
    for why in failed:
        click.echo(f"  failed: {why}", err=True)
    if failed:
        sys.exit(1)


def _torch(model: Path | None, embedding: Path | None, width: int | None, height: int | None, device: str,
           flags: dict) -> tuple[Translate, dict, Callable[[], int]]:
    import torch

    from r2r.models import load_components
    from r2r.runtime.reference import ReferencePipeline

    method = _method(None, **flags)
    model_dir = model or EMBEDDED_DEFAULT
    emb = embedding or model_dir / EMBEDDING_FILE
    dw, dh = default_resolution(model_dir)
    w, h = width or dw, height or dh
    if w % 8 or h % 8:
        raise ValueError(f"--width/--height must be multiples of 8, got {w}x{h}")
    pipe = ReferencePipeline(load_components(model_dir, device=device, dtype=torch.float32), emb, w, h)
    params = {**method.as_dict(), "width": w, "height": h, "backend": "torch", "model": model_dir.name,
              "embedding_sha256": sha256_file(emb), "r2r": __version__}
    return (lambda images: pipe(images, method)), params, lambda: round(pipe.count.per_image)


def _bundle(engine: Path | None, backend: str, precision: str | None, inversion: str, fused: str, batch: int,
            flags: dict, device: str = "auto") -> tuple[Translate, dict, Callable[[], int]]:
    from r2r import graph_io as io
    from r2r.runtime.bundle import open_bundle
    from r2r.runtime.scheduler import CoupledScheduler
    from r2r.runtime.select import default_bundle, default_precision, make_backend, resolve_backend, resolve_device

    if backend != "auto":
        resolve_device(backend, device)  # a device the backend cannot use fails before a bundle is exported
    root = engine or default_bundle(batch_max=max(4, batch))
    bundle = open_bundle(root)
    method = _method(bundle.method_defaults(), **flags)
    name = resolve_backend(backend, bundle, device)
    device = resolve_device(name, device)
    precision = precision or default_precision(name, bundle)
    be = make_backend(name, bundle, precision, device)
    use_fused = fused == "on"
    if fused == "auto" and io.UNET_FUSED in bundle.manifest.graphs and inversion == "exact":
        from r2r.runtime.timing import fused_is_faster

        use_fused = fused_is_faster(bundle, name, precision, batch, method, device=device)
    sched = CoupledScheduler(bundle, be, batch, method, inversion=inversion, fused=use_fused)  # type: ignore[arg-type]
    bundle_hash = hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()
    params = {**method.as_dict(), "width": bundle.width, "height": bundle.height, "backend": name,
              "precision": precision, "inversion": inversion, "fused": use_fused, "bundle_sha256": bundle_hash,
              "r2r": __version__}
    return sched, params, lambda: sched.unet_evaluations_per_image
