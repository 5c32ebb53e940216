"""`r2r-train`: the training-stage commands (dataset generation now; fine-tuning steps join the group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from r2r.checkpoints import model_option
from r2r.config import Method
from r2r.log import log
from r2r.options import method_options, model_source_options, resolve_source
from r2r.source import ModelSource
from r2r.training.loop import MIXED_PRECISION, LoopConfig


@click.group()
def main() -> None:
    """FashionR2R training tools: build datasets and train the rendered-to-real models."""


def _size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """Parse --size early so a typo fails before any work starts."""
    from r2r.training.data import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@main.command("data")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Dataset folder to create (train/ and test/, each with rendered/ and real/).",
)
@click.option("--count", required=True, type=click.IntRange(min=1), help="Number of designs (pairs).")
@click.option("--size", default="256x256", show_default=True, callback=_size, help="Image size WxH.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Dataset seed.")
@click.option(
    "--test-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Share of designs (the last ones) held out as paired test data.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def data(
    out: Path, count: int, size: tuple[int, int], seed: int, test_fraction: float, workers: int, overwrite: bool
) -> None:
    """Generate the procedural render/real garment dataset.

    Same arguments give byte-identical files, whatever --workers is; the result appears at --out
    only once complete.
    """
    from r2r.training.data import generate_dataset, split_counts

    try:
        path = generate_dataset(
            out, count, size, seed, test_fraction=test_fraction, workers=workers, overwrite=overwrite
        )
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from exc
    n_train, n_test = split_counts(count, test_fraction)
    click.echo(f"wrote {count} pairs ({n_train} train, {n_test} test) of {size[0]}x{size[1]} to {path}")


# --------------------------------------------------------------------------------------------------
# Domain Knowledge Injection, the tiny default's pretraining, evaluation (r2r.training.finetune,
# .embedding, .pretrain, .evaluate); heavy imports stay inside the commands.
# --------------------------------------------------------------------------------------------------

def loop_options(*, lr: float, max_steps: int, batch_size: int, weight_decay: float,
                 checkpoint_every: int = 500) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options of `LoopConfig`, with per-command defaults (diffusers' training-script names)."""

    opts = [
        click.option("--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True,
                     help="Images per micro-batch, per process."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Micro-batches per optimizer step."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=lr, show_default=True,
                     help="AdamW learning rate (constant after --lr-warmup-steps)."),
        click.option("--lr-warmup-steps", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--adam-weight-decay", type=click.FloatRange(min=0), default=weight_decay, show_default=True),
        click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="Gradient clipping (0: off)."),
        click.option("--max-steps", type=click.IntRange(min=1), default=max_steps, show_default=True,
                     help="Optimizer steps in total (a resumed run stops at the same count)."),
        click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION), default="no", show_default=True,
                     help="accelerate autocast; fp16 needs a GPU."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seeds the data order, noise and timesteps."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=checkpoint_every,
                     show_default=True, help="Optimizer steps between checkpoints (the last step always saves)."),
        click.option("--checkpoints-total-limit", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Checkpoints kept."),
        click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest (fresh if none)."),
        click.option("--ema", is_flag=True, help="Keep an EMA of the trained weights and save it."),
        click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.9999, show_default=True),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return wrap


def loop_config_from_options(options: dict[str, Any]) -> LoopConfig:
    """Pop `loop_options`' values from a command's keyword arguments into a LoopConfig."""
    names = {f.name for f in fields(LoopConfig)}
    values = {k: options.pop(k) for k in list(options) if k in names}
    values["progress"] = not options.pop("no_progress", False)
    try:
        return LoopConfig(**values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_PATH = click.Path(path_type=Path)
_TIMESTEP_BIAS = [
    click.option("--timestep-bias-portion", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="Share of timesteps drawn from --timestep-bias-range instead of uniformly."),
    click.option("--timestep-bias-range", type=(int, int), default=(0, 1000), show_default=True,
                 metavar="BEGIN END", help="Timesteps [BEGIN, END) of the biased share."),
]


def _with(opts: list) -> object:
    def wrap(fn: object) -> object:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return wrap


def _train_errors() -> tuple[type[BaseException], ...]:
    from r2r.models import ModelLoadError
    from r2r.training.finetune import DataError
    from r2r.training.loop import CheckpointError

    return (ModelLoadError, DataError, CheckpointError, FileExistsError)


def _report(result: object, what: str) -> None:
    if not result.completed:  # type: ignore[attr-defined]
        log(f"stopped at step {result.step}; rerun with --resume to finish")  # type: ignore[attr-defined]
        return
    click.echo(f"{what}: {result.output} (step {result.step}, {result.seconds:.0f} s of training)")  # type: ignore[attr-defined]


@main.command("finetune", short_help="DKI target domain: finetune the UNet on real images (eq. 6).")
@click.option("--model", type=_PATH, required=True, callback=model_option,
              help="SD 1.x to finetune: a diffusers directory or a single-file .safetensors checkpoint.")
@click.option("--data", type=_PATH, required=True,
              help="Folder of real images with metadata.jsonl, or an r2r dataset (uses train/real).")
@click.option("--out", type=_PATH, required=True, help="Run folder: OUT/model (the result), OUT/checkpoints.")
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="Training area as a side: each image trains at the aspect bucket of about RESOLUTION^2 pixels "
                   "closest to its own aspect [default: the model's own (256 for the tiny default), else 512].")
@click.option("--buckets/--no-buckets", default=True, show_default=True,
              help="Aspect-ratio buckets; --no-buckets: centre-cropped RESOLUTION squares.")
@click.option("--caption-dropout", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of captions replaced by the empty prompt (teaches the null text).")
@click.option("--cache-latents", is_flag=True, help="Encode every image once instead of every step.")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for UNet activation memory.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help="Train a LoRA of this rank on the UNet's attention projections instead of the whole UNet (PEFT; "
                   "use a higher --lr, e.g. 1e-4): OUT/lora/ holds it (for --lora), OUT/model the base with it fused.")
@_with(_TIMESTEP_BIAS)
@loop_options(lr=1e-5, max_steps=1000, batch_size=1, weight_decay=1e-2)
def finetune_cmd(model: Path, data: Path, out: Path, resolution: int | None, buckets: bool, caption_dropout: float,
                 cache_latents: bool, gradient_checkpointing: bool, lora_rank: int | None,
                 timestep_bias_portion: float, timestep_bias_range: tuple[int, int], **loop: object) -> None:
    """DKI, target domain (paper eq. 6): finetune the UNet on real images with their captions.

    Epsilon-prediction MSE; text encoder and VAE frozen. Writes OUT/model, a complete diffusers
    directory in which only the UNet differs from --model. Runs under accelerate (`accelerate launch`
    for several GPUs).
    """
    from r2r.training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model, data, out, loop_config_from_options(loop), resolution, buckets, caption_dropout,
                         cache_latents, gradient_checkpointing, timestep_bias_portion, *timestep_bias_range,
                         lora_rank=lora_rank)
    try:
        _report(finetune(cfg), "finetuned model")
    except _train_errors() as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("negative-embedding", short_help="DKI source domain: the 75-vector negative embedding (eq. 7).")
@click.option("--model", type=_PATH, required=True, callback=model_option,
              help="The finetuned SD 1.x (frozen): a diffusers directory or a .safetensors checkpoint.")
@click.option("--data", type=_PATH, required=True,
              help="Folder of renders with metadata.jsonl, or an r2r dataset (uses train/rendered).")
@click.option("--out", type=_PATH, required=True,
              help="Run folder: OUT/negative_embedding.safetensors (the result), OUT/checkpoints.")
@click.option("--token", default="<rendered>", show_default=True, help="Placeholder token of the embedding.")
@click.option("--num-vectors", type=click.IntRange(1, 75), default=75, show_default=True,
              help="Placeholder vectors (the paper: 75, the whole prompt).")
@click.option("--init-word", default="rendered", show_default=True,
              help="Vectors start at this word's embedding ('' = the mean token embedding).")
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="Training area as a side: each image trains at the aspect bucket of about RESOLUTION^2 pixels "
                   "closest to its own aspect [default: the model's own, else 512].")
@click.option("--buckets/--no-buckets", default=True, show_default=True,
              help="Aspect-ratio buckets; --no-buckets: centre-cropped RESOLUTION squares.")
@click.option("--cache-latents", is_flag=True, help="Encode every image once instead of every step.")
@_with(_TIMESTEP_BIAS)
@loop_options(lr=5e-4, max_steps=3000, batch_size=1, weight_decay=0.0)
def negative_embedding_cmd(model: Path, data: Path, out: Path, token: str, num_vectors: int, init_word: str,
                           resolution: int | None, buckets: bool, cache_latents: bool, timestep_bias_portion: float,
                           timestep_bias_range: tuple[int, int], **loop: object) -> None:
    """DKI, source domain (paper eq. 7): the negative domain embedding, trained on renders.

    The prompt is the placeholder tokens alone; every weight of the model stays frozen, only the
    vectors train. The result loads with diffusers' `load_textual_inversion(path, token=TOKEN)`.
    """
    from r2r.training.embedding import EmbeddingConfig, train_negative_embedding

    cfg = EmbeddingConfig(model, data, out, loop_config_from_options(loop), token, num_vectors, init_word,
                          resolution=resolution, buckets=buckets, cache_latents=cache_latents,
                          timestep_bias_portion=timestep_bias_portion, timestep_bias_begin=timestep_bias_range[0],
                          timestep_bias_end=timestep_bias_range[1])
    try:
        _report(train_negative_embedding(cfg), "negative embedding")
    except (*_train_errors(), ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("pretrain-tiny", short_help="Train the embedded tiny default from scratch, then DKI.")
@click.option("--data", type=_PATH, required=True, help="An r2r dataset (`r2r-train data --size 256x256`).")
@click.option("--out", type=_PATH, required=True, help="Work folder (one subfolder per stage).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch CPU threads (results are deterministic for a given count).")
@click.option("--vae-steps", type=click.IntRange(min=1), default=None, help="[default: the recipe's]")
@click.option("--unet-steps", type=click.IntRange(min=1), default=None, help="[default: the recipe's]")
@click.option("--finetune-steps", type=click.IntRange(min=1), default=None, help="[default: the recipe's]")
@click.option("--embedding-steps", type=click.IntRange(min=1), default=None, help="[default: the recipe's]")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--no-ablation", is_flag=True, help="Skip the base model's embedding (the w/o-finetune row).")
@click.option("--install", type=_PATH, default=None,
              help="Also copy the result there (e.g. r2r/embedded/tiny, the shipped default).")
@click.option("--resume", is_flag=True, help="Continue a run in OUT: finished stages are kept.")
@click.option("--no-progress", is_flag=True)
def pretrain_tiny_cmd(data: Path, out: Path, seed: int, threads: int, vae_steps: int | None,
                      unet_steps: int | None, finetune_steps: int | None, embedding_steps: int | None,
                      checkpoint_every: int, no_ablation: bool, install: Path | None, resume: bool,
                      no_progress: bool) -> None:
    """Train the embedded tiny default from scratch: VAE, UNet, then DKI (finetune, negative embedding).

    Writes OUT/embedded (diffusers directory + negative_embedding.safetensors + training.json).
    """
    from dataclasses import replace

    from r2r.training.pretrain import PretrainConfig, pretrain_tiny

    cfg = PretrainConfig(data, out, seed=seed, threads=threads, resume=resume, progress=not no_progress,
                         checkpoint_every=checkpoint_every, install=install, ablation=not no_ablation)
    steps = {"vae_steps": vae_steps, "unet_steps": unet_steps, "finetune_steps": finetune_steps,
             "embedding_steps": embedding_steps}
    cfg = replace(cfg, **{k: v for k, v in steps.items() if v is not None})
    try:
        path = pretrain_tiny(cfg)
    except _train_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"tiny default: {path}")


@main.command("evaluate", short_help="Ablation on the paired test split: SSIM, PSNR, realism.")
@model_source_options
@click.option("--base-model", type=_PATH, default=None, callback=model_option,
              help="The pre-DKI model, for the w/o-finetune row (skipped when absent).")
@click.option("--base-embedding", type=_PATH, default=None,
              help="The base model's own negative embedding [default: BASE/negative_embedding.safetensors].")
@click.option("--data", type=_PATH, required=True, help="An r2r dataset with a paired test split.")
@click.option("--out", type=_PATH, required=True, help="Report folder (report.json, report.md, grids, images).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N test images only.")
@method_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--classifier-steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--no-progress", is_flag=True)
@click.option("--caption-guidance", "caption_guidance", type=click.FloatRange(min=0.0, min_open=True),
              multiple=True,
              help="Also a row with each test render's caption (its metadata.jsonl text) as the prompt, at this "
                   "text guidance w_t (repeatable; docs/design.md, \"Prompts\").")
def evaluate_cmd(source: ModelSource, base_model: Path | None, base_embedding: Path | None, data: Path, out: Path,
                 limit: int | None, method: Method, batch_size: int, classifier_steps: int, seed: int,
                 threads: int | None, no_progress: bool, caption_guidance: tuple[float, ...]) -> None:
    """The ablation on the test split: SSIM/PSNR vs the real ground truth, SSIM vs the render, realism."""
    from dataclasses import replace

    from r2r.training.evaluate import EvalConfig, evaluate

    if threads:
        import torch

        torch.set_num_threads(threads)
    resolved = resolve_source(source)
    cfg = EvalConfig(resolved.model, resolved.embedding, data, out, base_model, base_embedding, limit,
                     replace(method, tac_divisor=method.divisor), batch_size, classifier_steps, seed,
                     progress=not no_progress, text_guidance=caption_guidance)
    try:
        report = evaluate(cfg)
    except _train_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo((out / "report.md").read_text(encoding="utf-8"))
    click.echo(f"report: {out / 'report.json'} ({report['seconds']:.0f} s)")


if __name__ == "__main__":  # `accelerate launch -m r2r.training.cli ...`
    main()
