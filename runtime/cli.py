"""`r2r-run`: translate rendered images to real ones."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from r2r import __version__
from r2r.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_TAC_DIVISOR,
    DEFAULT_TAC_RATIO,
    MethodConfig,
)
from r2r.imageio import ImageReadError, collect_inputs, load_rgb, output_path_for, save_png
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, ModelLoadError, default_resolution, sha256_file


def _resolve_model(model: Path | None, embedding: Path | None) -> tuple[Path, Path]:
    model_dir = model or EMBEDDED_DEFAULT
    emb = embedding or model_dir / EMBEDDING_FILE
    return model_dir, emb


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "inputs", multiple=True, metavar="PATH...",
              help="Images, folders, globs or .txt lists of paths (repeatable; more may follow as arguments).")
@click.argument("more_inputs", nargs=-1, metavar="[PATH]...")
@click.option("--output", "output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True,
              help="torch: the PyTorch reference.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Diffusers SD 1.x directory [default: the embedded tiny model].")
@click.option("--embedding", type=click.Path(path_type=Path), default=None,
              help="Negative domain embedding (.safetensors) [default: MODEL/negative_embedding.safetensors].")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True)
@click.option("--strength", type=float, default=DEFAULT_STRENGTH, show_default=True)
@click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True)
@click.option("--tac-ratio", type=float, default=DEFAULT_TAC_RATIO, show_default=True)
@click.option("--tac-divisor", type=int, default=DEFAULT_TAC_DIVISOR, show_default=True)
@click.option("--tac-target", type=click.Choice(["null", "both"]), default="null", show_default=True,
              help="Which guidance pass TAC controls (the public code: null).")
@click.option("--width", type=int, default=None, help="[default: the model's own resolution]")
@click.option("--height", type=int, default=None, help="[default: the model's own resolution]")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for --backend torch.")
def main(inputs: tuple[str, ...], more_inputs: tuple[str, ...], output: Path, backend: str,
         model: Path | None, embedding: Path | None, steps: int, strength: float, guidance: float,
         tac_ratio: float, tac_divisor: int, tac_target: str, width: int | None, height: int | None,
         batch_size: int, device: str) -> None:
    """Translate rendered images into realistic photos (FashionR2R), one PNG per input."""
    from tqdm import tqdm

    specs = list(inputs) + list(more_inputs)
    if not specs:
        raise click.UsageError("no input: pass --input PATH (files, folders, globs or a .txt list)")
    try:
        method = MethodConfig(steps, strength, guidance, tac_ratio, tac_divisor, tac_target)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if batch_size < 1:
        raise click.BadParameter("--batch-size must be >= 1")
    try:
        paths = collect_inputs(specs)
    except ImageReadError as exc:
        raise click.UsageError(str(exc)) from exc
    if not paths:
        raise click.UsageError(f"no image found in {', '.join(specs)}")

    model_dir, emb = _resolve_model(model, embedding)
    dw, dh = default_resolution(model_dir)
    width, height = width or dw, height or dh
    if width % 8 or height % 8:
        raise click.BadParameter(f"--width/--height must be multiples of 8, got {width}x{height}")

    import torch
    from r2r.runtime.reference import ReferencePipeline

    from r2r.models import load_components

    try:
        comps = load_components(model_dir, device=device, dtype=torch.float32)
        pipe = ReferencePipeline(comps, emb, width, height)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc

    params = {**method.as_dict(), "width": width, "height": height, "backend": backend,
              "model": model_dir.name, "embedding_sha256": sha256_file(emb), "r2r": __version__}
    output.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    done = 0
    start = time.perf_counter()
    bar = tqdm(total=len(paths), unit="img", desc="r2r-run", file=sys.stderr)
    for k in range(0, len(paths), batch_size):
        chunk = paths[k : k + batch_size]
        images, ok = [], []
        for p in chunk:
            try:
                images.append(load_rgb(p, (width, height)))
                ok.append(p)
            except ImageReadError as exc:
                failed.append((p, str(exc)))
                bar.update(1)
        if ok:
            outs = pipe(images, method)
            for p, img in zip(ok, outs, strict=True):
                text = {"r2r:parameters": json.dumps({**params, "source": p.name}, sort_keys=True),
                        "Software": f"r2r {__version__}"}
                save_png(output_path_for(p, output), img, text)
                done += 1
                bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix(img_s=f"{done / elapsed:.2f}" if elapsed > 0 else "-")
    bar.close()
    elapsed = time.perf_counter() - start
    click.echo(f"r2r-run: {done} written, {len(failed)} failed, {elapsed:.1f} s "
               f"({done / elapsed if elapsed else 0:.2f} img/s, {pipe.count.per_image:.0f} UNet evaluations "
               f"per image) -> {output}", err=True)
    for _, why in failed:
        click.echo(f"  failed: {why}", err=True)
    if failed:
        sys.exit(1)
