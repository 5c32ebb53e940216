"""The command-line options every command shares, defined once: the model source (`--model/--lora/--embedding/
--token`), the method (`--steps ... --tac-target`, ranges checked by click with the flag named) and `--threads`.
Each decorator hands the command one typed value (`source: ModelSource`, `method: Method`) instead of its flags."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from r2r.config import ATTENTION_POOLS, MAX_CACHE_INTERVAL, Method
from r2r.lora import LoraSpec, check_lora, parse_lora
from r2r.models import ModelLoadError
from r2r.source import ModelSource, ResolvedSource

F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = ("SD 1.x: a diffusers directory or a single-file .safetensors checkpoint [default: the embedded tiny "
              "model].")
LORA_HELP = ("A LoRA (.safetensors; diffusers/PEFT or kohya keys) fused into the model's UNet and text encoder first, "
             "at SCALE [default 1] (repeatable).")
EMBEDDING_HELP = "Negative embedding .safetensors [default: MODEL/negative_embedding.safetensors]."
TOKEN_HELP = "The embedding's token [default: its own: the key of a diffusers file, the name of an A1111 one]."
METHOD_FLAGS = {"steps": "--steps", "strength": "--strength", "guidance": "--guidance", "tac_ratio": "--tac-ratio",
                "tac_divisor": "--tac-divisor", "tac_target": "--tac-target", "attention_pool": "--attention-pool",
                "cache_interval": "--cache-interval", "text_guidance": "--text-guidance", "text_tac": "--text-tac"}


def grouped(f: F, names: tuple[str, ...], into: str, make: Callable[..., Any]) -> F:
    """Wrap `f` so that the options `names` arrive as one value `into` = make(**those options)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs[into] = make(**{n: kwargs.pop(n) for n in names})
        return f(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def model_source_options(f: F) -> F:
    """--model, --lora, --embedding, --token, handed to the command as `source: ModelSource` (resolved later, by
    `resolve_source`, so that a command refuses flags before it converts or fuses anything)."""
    wrapped = grouped(f, ("model", "lora", "embedding", "token"), "source",
                       lambda model, lora, embedding, token: ModelSource(model, tuple(_lora(v) for v in lora),
                                                                         embedding, token))
    for opt in reversed([
        click.option("--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP),
        click.option("--lora", multiple=True, metavar="FILE[:SCALE]", help=LORA_HELP),
        click.option("--embedding", type=click.Path(path_type=Path), default=None, help=EMBEDDING_HELP),
        click.option("--token", default=None, help=TOKEN_HELP),
    ]):
        wrapped = opt(wrapped)
    return wrapped


def _lora(text: str) -> LoraSpec:
    """A `--lora` value checked as it is given (a pickle or a missing file refused before any input is read)."""
    try:
        return check_lora(parse_lora(text))
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="'--lora'") from exc


def resolve_source(source: ModelSource) -> ResolvedSource:
    """The source resolved (a checkpoint converted, LoRAs fused, once), a model error as the command's error."""
    try:
        return source.resolve()
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc


def method_from(**given: Any) -> Method:
    """A Method of the values given (None: not given), refused by flag name where it is not one."""
    try:
        return Method(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def method_options(f: F) -> F:
    """--steps, --strength, --guidance (--domain-guidance), --tac-ratio, --tac-divisor, --tac-target,
    --attention-pool, --cache-interval, --text-guidance, --text-tac, handed to the command as `method: Method` (what
    is not given: the bundle's defaults)."""
    wrapped = grouped(f, tuple(METHOD_FLAGS), "method", method_from)
    for opt in reversed([
        click.option("--steps", type=click.IntRange(1, 1000), default=None, help="[default: the bundle's, 50]"),
        click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="[default: the bundle's, 0.3]"),
        click.option("--guidance", "--domain-guidance", "guidance", type=click.FloatRange(min=0.0), default=None,
                     help="w_d, the domain term's weight (paper eq. 8) [default: the bundle's, 7.5]"),
        click.option("--tac-ratio", type=click.FloatRange(0.0, 1.0), default=None, help="[default: the bundle's, 0.9]"),
        click.option("--tac-divisor", type=click.IntRange(min=1), default=None,
                     help="[default: the bundle's, 256; without --engine the cached bundle is exported with it]"),
        click.option("--tac-target", type=click.Choice(["null", "both"]), default=None,
                     help="--backend reference only: which guidance pass TAC controls [default: null]."),
        click.option("--attention-pool", type=click.Choice([str(p) for p in ATTENTION_POOLS]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="The first level's self-attention takes keys and values from the token grid pooled F x F: "
                          "F**2 less attention work, an approximation [default: the bundle's, 1 (off); without "
                          "--engine the cached bundle is exported with it]."),
        click.option("--cache-interval", type=click.IntRange(1, MAX_CACHE_INTERVAL), default=None,
                     help="Step caching: every K-th UNet call of each branch is whole, the others run the first "
                          "level on the deep features it cached, an approximation [default: the model's (the embedded "
                          "default's 3, measured within its quality bar; else 1, off) in the fused program, else 1; "
                          "K > 1 needs a bundle exported with --step-cache, which r2r-run exports without "
                          "--engine]."),
        click.option("--text-guidance", type=click.FloatRange(min=0.0), default=None,
                     help="w_t, the prompt's term beside the domain term: e = e_neg + w_d (e_null - e_neg) + w_t "
                          "(e_text - e_null) (docs/design.md, \"Prompts\"); with a prompt and w_t > 0 each guided "
                          "UNet batch gains a text row [default: 0, the paper's program exactly]."),
        click.option("--text-tac/--no-text-tac", default=None,
                     help="Whether the prompt's row is under TAC like the null row [default: on]."),
    ]):
        wrapped = opt(wrapped)
    return wrapped


def threads_option(default: int = 0, help: str = "CPU threads per backend session (0: all cores).") -> Callable[[F], F]:
    return click.option("--threads", type=click.IntRange(min=0), default=default, show_default=True, help=help)


__all__ = ["EMBEDDING_HELP", "LORA_HELP", "METHOD_FLAGS", "MODEL_HELP", "TOKEN_HELP", "grouped", "method_from",
           "method_options", "model_source_options", "resolve_source", "threads_option"]
