"""The method's parameters (`Method`): one typed, validated value, made once from the values given and used by the
reference, the export, the runtime and every command."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

# Defaults of the paper's public code (docs/design.md, "Defaults").
DEFAULT_STEPS = 50
DEFAULT_STRENGTH = 0.3
DEFAULT_GUIDANCE = 7.5
DEFAULT_TAC_RATIO = 0.9
DEFAULT_TAC_DIVISOR = 256
ATTENTION_POOLS = (1, 2, 4)  # docs/design.md, "Less work per image"
MAX_CACHE_INTERVAL = 10  # step caching: K whole UNet calls apart at most (DeepCache's uniform interval)
SD15_DEFAULT_RESOLUTION = (768, 1024)  # (W, H), the public code's default for SD 1.5 models

TacTarget = Literal["null", "both"]
Inversion = Literal["exact", "single-pass"]
INVERSIONS: tuple[Inversion, ...] = ("exact", "single-pass")


@dataclass(frozen=True)
class Method:
    """Realistic Image Generation parameters (docs/design.md, "The method"). Change one with `dataclasses.replace`.

    `tac_divisor` None: the bundle's (which chose its TAC layers at export; 256 there by default); `attention_pool`
    None: the bundle's (its UNet graphs are exported with it; 1, off, by default). `cache_interval` K: step caching,
    every K-th UNet call of each branch whole and the others on its cached deep features (1: off); None: the
    model's own default where the program can cache (its r2r_defaults.json, kept in its bundles), else off
    (docs/design.md, "Less work per image"). A bundle resolves all three (`Bundle.method`), so the method every
    output records is complete. `text_guidance` w_t: with a prompt, e = e_neg + w (e_null - e_neg) + w_t (e_text -
    e_null) (docs/design.md, "Prompts"); `text_tac`: whether the prompt's row is under TAC like the null row."""

    steps: int = DEFAULT_STEPS
    strength: float = DEFAULT_STRENGTH
    guidance: float = DEFAULT_GUIDANCE
    tac_ratio: float = DEFAULT_TAC_RATIO
    tac_divisor: int | None = None
    tac_target: TacTarget = "null"
    attention_pool: int | None = None
    cache_interval: int | None = None
    text_guidance: float = 0.0  # w_t: the prompt's term beside the domain term (0: the paper's one-term guidance)
    text_tac: bool = True  # the prompt's row takes the cg pass's Q/K in the TAC window, as the null row does

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in [1, 1000], got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if min(int(self.steps * self.strength), self.steps) < 1:
            raise ValueError(
                f"steps * strength = {self.steps * self.strength:g} gives no denoising step; "
                "raise --steps or --strength"
            )
        if not 0.0 <= self.tac_ratio <= 1.0:
            raise ValueError(f"tac_ratio must be in [0, 1], got {self.tac_ratio}")
        if self.tac_divisor is not None and self.tac_divisor < 1:
            raise ValueError(f"tac_divisor must be >= 1, got {self.tac_divisor}")
        if self.tac_target not in ("null", "both"):
            raise ValueError(f"tac_target must be 'null' or 'both', got {self.tac_target!r}")
        if self.attention_pool is not None and self.attention_pool not in ATTENTION_POOLS:
            raise ValueError(f"attention_pool must be one of {', '.join(map(str, ATTENTION_POOLS))}, "
                             f"got {self.attention_pool}")
        if not (math.isfinite(self.text_guidance) and self.text_guidance >= 0):
            raise ValueError(f"text_guidance must be a finite number >= 0, got {self.text_guidance}")
        if self.cache_interval is not None and not 1 <= self.cache_interval <= MAX_CACHE_INTERVAL:
            raise ValueError(f"cache_interval must be in [1, {MAX_CACHE_INTERVAL}], got {self.cache_interval}")

    @property
    def divisor(self) -> int:
        """The TAC divisor to choose layers with: the one given, else the export's default."""
        return DEFAULT_TAC_DIVISOR if self.tac_divisor is None else self.tac_divisor

    @property
    def pool(self) -> int:
        """The attention pool to evaluate with: the one given, else off."""
        return 1 if self.attention_pool is None else self.attention_pool

    @property
    def interval(self) -> int:
        """The step-cache interval to evaluate with: the one given, else off."""
        return 1 if self.cache_interval is None else self.cache_interval

    def complete(self, divisor: int, pool: int, interval: int) -> Method:
        """This method with what was not given (None) taken from a bundle's or a model's defaults."""
        return replace(self, tac_divisor=divisor if self.tac_divisor is None else self.tac_divisor,
                       attention_pool=pool if self.attention_pool is None else self.attention_pool,
                       cache_interval=interval if self.cache_interval is None else self.cache_interval)

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    """How the method is evaluated, not what it computes (docs/design.md, "UNet evaluations per image").

    `inversion`: "exact" evaluates the UNet at each inversion step's own (latent, timestep) pair and runs a cg pass
    per TAC step (58 evaluations per image at the defaults); "single-pass" reuses each step's evaluation for the
    next step and keeps the window's Q/K from the inversion (46; another epsilon convention, so other numbers).
    `fused`: in the TAC window, one `unet_fused` call on [cg, neg, null] instead of `unet_emit` + `unet_inject`
    (the same numbers; a bundle graph choice, exact inversion only).
    """

    inversion: Inversion = "exact"
    fused: bool = False

    def __post_init__(self) -> None:
        if self.inversion not in INVERSIONS:
            raise ValueError(f"inversion must be one of {', '.join(INVERSIONS)}, got {self.inversion!r}")
        if self.fused and self.inversion != "exact":
            raise ValueError("the fused graph pairs with exact inversion only")
