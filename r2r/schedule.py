"""DDIM schedule math (docs/design.md, "Schedule", "Inversion", "Generation"): the one definition.

Alphas are computed with the same float32 operations as diffusers' DDIMScheduler, so that every
backend steps with the same numbers; `ddim_transfer` is the literal two-line DDIM update used by the
reference, `transfer_coefficients` its fused affine form for the runtime, `forward_noise` the noising
that training and the evaluation's DKI probe apply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from r2r.config import Method

T = TypeVar("T", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers scheduler config that fixes DDIM's alphas and timesteps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SchedulerConfig:
        known = {f: cfg[f] for f in cls.__dataclass_fields__ if f in cfg and cfg[f] is not None}
        if "trained_betas" in known:
            known["trained_betas"] = tuple(float(b) for b in known["trained_betas"])
        out = cls(**known)
        if out.prediction_type != "epsilon":
            raise ValueError(
                f"prediction_type {out.prediction_type!r} is not supported: FashionR2R uses "
                "epsilon-prediction SD 1.x models"
            )
        if out.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {out.timestep_spacing!r} is not supported")
        return out

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> SchedulerConfig:
        path = Path(model_dir) / "scheduler" / "scheduler_config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: missing; a diffusers model directory has scheduler/") from exc

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """float32 [num_train_timesteps], the same operations as DDIMScheduler.__init__."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported")
    if cfg.rescale_betas_zero_snr:
        raise ValueError("rescale_betas_zero_snr models are not supported (they need v-prediction)")
    return torch.cumprod(1.0 - betas, dim=0).numpy()


def inference_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps(steps).timesteps, descending int64."""
    n = cfg.num_train_timesteps
    if steps > n:
        raise ValueError(f"steps {steps} exceeds the model's {n} training timesteps")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    ratio = n / steps
    return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1


@dataclass(frozen=True)
class Schedule:
    """The n denoising timesteps of one run and their alphas (float32 values, held as floats).

    `timesteps[i]` is generation step i (descending); inversion walks the same list ascending.
    `alpha[i]` = a(t), `alpha_prev[i]` = a(t - D) with a(<0) = final_alpha_cumprod.
    """

    timesteps: tuple[int, ...]
    alpha: tuple[float, ...]
    alpha_prev: tuple[float, ...]
    steps: int
    stride: int = field(default=0)

    @property
    def n(self) -> int:
        return len(self.timesteps)


def make_schedule(cfg: SchedulerConfig, method: Method) -> Schedule:
    """docs/design.md, "Schedule": n = min(int(steps * strength), steps), ts = timesteps[steps - n:]."""
    steps = method.steps
    all_ts = inference_timesteps(cfg, steps)
    n = min(int(steps * method.strength), steps)
    ts = all_ts[steps - n :]
    ac = alphas_cumprod(cfg)
    final = ac[0]  # set_alpha_to_one=False
    stride = cfg.num_train_timesteps // steps
    alpha = tuple(float(ac[t]) for t in ts)
    alpha_prev = tuple(float(ac[t - stride]) if t - stride >= 0 else float(final) for t in ts)
    return Schedule(tuple(int(t) for t in ts), alpha, alpha_prev, steps, stride)


def ddim_transfer(z: T, eps: T, a_from: float, a_to: float) -> T:
    """Move latent `z` at noise level `a_from` to `a_to` along the eps direction (DDIM, eta=0).

    Generation uses (a(t), a(t-D)); inversion (a(t-D), a(t)). The scalars are float32 like
    diffusers' `alphas_cumprod`, so the arithmetic matches DDIMScheduler.step in float32.
    """
    if isinstance(z, torch.Tensor):
        af = torch.tensor(a_from, dtype=torch.float32)
        at = torch.tensor(a_to, dtype=torch.float32)
    else:
        af, at = np.float32(a_from), np.float32(a_to)
    x0 = (z - (1 - af) ** 0.5 * eps) / af**0.5
    return at**0.5 * x0 + (1 - at) ** 0.5 * eps


def forward_noise(z0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """Training's forward process q(z_t | z_0) (paper eqs. 6/7): sqrt(a) z0 + sqrt(1 - a) noise.

    A float `a` is taken in float32, as the alphas are; a tensor broadcasts per sample.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=torch.float32, device=z0.device)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def transfer_coefficients(a_from: float, a_to: float) -> tuple[float, float]:
    """`ddim_transfer` as z' = cz * z + ce * eps (float64), for fused runtime kernels."""
    cz = math.sqrt(a_to) / math.sqrt(a_from)
    ce = math.sqrt(1.0 - a_to) - math.sqrt(a_to) * math.sqrt(1.0 - a_from) / math.sqrt(a_from)
    return cz, ce


def guide(eps_neg: T, eps_null: T, guidance: float, eps_text: T | None = None, text_guidance: Any = 0.0) -> T:
    """Paper eq. 8: e = e_neg + w (e_null - e_neg); with a prompt's `eps_text`, the disentangled second term
    + w_t (e_text - e_null) (docs/design.md, "Prompts"). `text_guidance` may be per row (broadcast against eps);
    without `eps_text` the operations are eq. 8's alone."""
    eps = eps_neg + guidance * (eps_null - eps_neg)
    if eps_text is None:
        return eps
    return eps + text_guidance * (eps_text - eps_null)
