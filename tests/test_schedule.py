"""The schedule math against diffusers' DDIMScheduler, and the inversion/generation pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from r2r.config import Method
from r2r.schedule import (
    SchedulerConfig,
    alphas_cumprod,
    ddim_transfer,
    forward_noise,
    inference_timesteps,
    make_schedule,
    transfer_coefficients,
)

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
        "set_alpha_to_one": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
VARIANTS = [
    SD15,
    {**SD15, "timestep_spacing": "trailing", "steps_offset": 0},
    {**SD15, "timestep_spacing": "linspace"},
    {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {**SD15, "beta_schedule": "squaredcos_cap_v2"},
]


def _diffusers(cfg: dict) -> DDIMScheduler:
    return DDIMScheduler.from_config({**cfg, "clip_sample": False, "set_alpha_to_one": False})


@pytest.mark.parametrize("cfg", VARIANTS)
def test_alphas_equal_diffusers_bit_for_bit(cfg: dict) -> None:
    ours = alphas_cumprod(SchedulerConfig.from_dict(cfg))
    np.testing.assert_array_equal(ours, _diffusers(cfg).alphas_cumprod.numpy())


@pytest.mark.parametrize("cfg", VARIANTS)
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333, 1000])
def test_timesteps_equal_diffusers(cfg: dict, steps: int) -> None:
    ref = _diffusers(cfg)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(inference_timesteps(SchedulerConfig.from_dict(cfg), steps), ref.timesteps.numpy())


@pytest.mark.parametrize(("steps", "strength"), [(50, 0.3), (50, 1.0), (20, 0.55), (30, 0.5), (10, 0.1)])
def test_schedule_takes_the_last_n_timesteps_with_diffusers_alphas(steps: int, strength: float) -> None:
    ref = _diffusers(SD15)
    ref.set_timesteps(steps)
    sched = make_schedule(SchedulerConfig.from_dict(SD15), Method(steps=steps, strength=strength))
    n = min(int(steps * strength), steps)
    assert sched.n == n
    assert list(sched.timesteps) == ref.timesteps[steps - n:].tolist()
    for t, a, ap in zip(sched.timesteps, sched.alpha, sched.alpha_prev, strict=True):
        prev = t - ref.config.num_train_timesteps // steps
        assert a == float(ref.alphas_cumprod[t])
        assert ap == float(ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod)


def test_defaults_give_fifteen_steps_from_281_down_to_1() -> None:
    sched = make_schedule(SchedulerConfig.from_dict(SD15), Method())
    assert sched.timesteps == tuple(range(281, 0, -20))


def test_generation_transfer_equals_ddim_scheduler_step() -> None:
    ref = _diffusers(SD15)
    ref.set_timesteps(50)
    sched = make_schedule(SchedulerConfig.from_dict(SD15), Method(steps=50, strength=1.0))
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        expected = ref.step(e, int(t), z).prev_sample
        got = ddim_transfer(z, e, sched.alpha[i], sched.alpha_prev[i])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forward_noise_equals_diffusers_add_noise() -> None:
    ref = _diffusers(SD15)
    alphas = torch.from_numpy(alphas_cumprod(SchedulerConfig.from_dict(SD15)).copy())
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 281, 999])
    expected = ref.add_noise(z0, noise, t)
    torch.testing.assert_close(forward_noise(z0, noise, alphas[t].view(3, 1, 1, 1)), expected, rtol=0, atol=1e-6)
    one = forward_noise(z0[1:2], noise[1:2], float(alphas[281]))  # a float alpha is taken in float32
    torch.testing.assert_close(one, expected[1:2], rtol=0, atol=1e-6)


def test_fused_coefficients_match_the_literal_update() -> None:
    g = np.random.default_rng(0)
    z, e = g.standard_normal(1000), g.standard_normal(1000)
    for a_from, a_to in [(0.99915, 0.9), (0.5, 0.2), (0.2, 0.5), (0.04, 0.99)]:
        cz, ce = transfer_coefficients(a_from, a_to)
        lit = ddim_transfer(z, e, a_from, a_to)
        np.testing.assert_allclose(cz * z + ce * e, lit, rtol=1e-5, atol=1e-5)


def test_inversion_then_generation_is_exact_when_eps_ignores_the_latent() -> None:
    """With eps a function of t alone both walks are affine and pair up step by step."""
    sched = make_schedule(SchedulerConfig.from_dict(SD15), Method(steps=50, strength=0.6))
    rng = np.random.default_rng(1)
    eps_of_t = {t: rng.standard_normal((4, 8, 8)) for t in sched.timesteps}
    z0 = rng.standard_normal((4, 8, 8))
    z = z0
    for j in reversed(range(sched.n)):
        z = ddim_transfer(z, eps_of_t[sched.timesteps[j]], sched.alpha_prev[j], sched.alpha[j])
    for i, t in enumerate(sched.timesteps):
        z = ddim_transfer(z, eps_of_t[t], sched.alpha[i], sched.alpha_prev[i])
    np.testing.assert_allclose(z, z0, atol=2e-5)


def test_v_prediction_models_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="v_prediction"):
        SchedulerConfig.from_dict({**SD15, "prediction_type": "v_prediction"})


def test_method_config_refuses_a_run_with_no_step() -> None:
    with pytest.raises(ValueError, match="no denoising step"):
        Method(steps=10, strength=0.05)
