"""The PyTorch reference against an independent implementation of the method (docs/design.md, "The method"):
`support.independent`, which shares no code with r2r's method modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.independent import H, Independent, W, render_image

from r2r.config import Method
from r2r.models import load_components
from r2r.reference import ReferencePipeline


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> ReferencePipeline:
    return ReferencePipeline(load_components(tiny_model_dir), tiny_model_dir / "negative_embedding.safetensors", W, H)


@pytest.fixture(scope="module")
def independent(tiny_model_dir: Path) -> Independent:
    return Independent(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors")


def _run_latent(ref: ReferencePipeline, image: np.ndarray, m: Method) -> torch.Tensor:
    sched = ref.schedule(m)
    return ref.generate(ref.invert(ref.encode([image]), sched), sched, m)


def test_conditioning_equals_diffusers_textual_inversion_encoding(reference, independent) -> None:
    torch.testing.assert_close(reference.c_null, independent.c_null, rtol=0, atol=0)
    torch.testing.assert_close(reference.c_neg, independent.c_neg, rtol=0, atol=0)


@pytest.mark.parametrize("method", [
    Method(),
    Method(steps=20, strength=0.5, guidance=3.0, tac_ratio=0.5, tac_divisor=64),
    Method(steps=10, strength=1.0, tac_ratio=1.0, tac_divisor=1024),
])
def test_reference_equals_an_independent_implementation(reference, independent, method) -> None:
    image = render_image(1)
    expected_img, expected_z = independent(image, method, return_latents=True)
    z = _run_latent(reference, image, method)
    torch.testing.assert_close(z, expected_z, rtol=0, atol=1e-5)
    got = reference([image], method)[0]
    assert np.abs(got.astype(int) - expected_img.astype(int)).max() <= 1


@pytest.mark.parametrize("method", [Method(), Method(steps=20, strength=0.5, guidance=3.0, tac_ratio=0.5)])
def test_single_pass_reference_equals_an_independent_single_pass(reference, independent, method) -> None:
    """The oracle of `--inversion single-pass`: eps reused from the previous latent's own timestep, the window's
    Q/K kept from the inversion."""
    image = render_image(8)
    expected_img, expected_z = independent(image, method, return_latents=True, single_pass=True)
    sched = reference.schedule(method)
    latents, kept = reference.invert_single_pass(reference.encode([image]), sched, method)
    z = reference.generate(latents, sched, method, kept)
    torch.testing.assert_close(z, expected_z, rtol=0, atol=1e-5)
    reference.count.__init__()
    got = reference([image], method, inversion="single-pass")[0]
    assert np.abs(got.astype(int) - expected_img.astype(int)).max() <= 1
    if method == Method():
        assert reference.count.per_image == 46  # 16 + 30
    exact = _run_latent(reference, image, method)
    assert (exact - z).abs().max().item() > 1e-3  # another epsilon convention: another result


def test_tac_with_ratio_zero_equals_plain_generation_exactly(reference, independent) -> None:
    image = render_image(2)
    m = Method(tac_ratio=0.0)
    _, plain = independent(image, m, return_latents=True)  # no Q/K swapped: window empty
    z = _run_latent(reference, image, m)
    assert torch.equal(z, plain)


def test_tac_changes_the_output_when_on(reference) -> None:
    image = render_image(3)
    off = _run_latent(reference, image, Method(tac_ratio=0.0))
    on = _run_latent(reference, image, Method(tac_ratio=0.9))
    assert (on - off).abs().max().item() > 1e-3


def test_unet_evaluations_per_image_are_58_at_the_defaults(reference) -> None:
    reference.count.__init__()
    reference([render_image(4)], Method())
    assert reference.count.per_image == 58
    assert reference.count.by_stage == {"inversion": 15, "generation_cg": 13, "generation": 30}


def test_batch_of_two_equals_two_single_runs(reference) -> None:
    a, b = render_image(5), render_image(6)
    m = Method(steps=20, strength=0.5)
    both = reference([a, b], m)
    singles = [reference([a], m)[0], reference([b], m)[0]]
    for x, y in zip(both, singles, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


# Inversion then plain generation (null text, guidance 1, no TAC) walks back to z0. DDIM inversion
# is exact only in the limit of small steps (it evaluates eps at z_{t-1} in place of z_t), so the
# error is first order in the step: on the seeded random-init tiny model (whose eps varies fast with
# z) it measured 0.38, 0.33, 0.25, 0.17 of the distance travelled at 50, 100, 200, 400 steps
# (strength 0.3, 8 latent channels). The bound: at 400 steps under 20%, and under half the
# 100-step error (the error must shrink with the step, as a first-order error does).
RECONSTRUCTION_BOUND = 0.20


def _reconstruction(reference: ReferencePipeline, z0: torch.Tensor, steps: int) -> tuple[float, float]:
    m = Method(steps=steps, guidance=1.0, tac_ratio=0.0)
    sched = reference.schedule(m)
    latents = reference.invert(z0, sched)
    rec = reference.generate(latents, sched, m)
    return (rec - z0).norm().item(), (latents[0] - z0).norm().item()


def test_inversion_then_plain_generation_reconstructs_the_input_latent(reference) -> None:
    z0 = reference.encode([render_image(7)])
    coarse, _ = _reconstruction(reference, z0, 100)
    fine, travelled = _reconstruction(reference, z0, 400)
    assert travelled > z0.norm().item()
    assert fine < RECONSTRUCTION_BOUND * travelled
    assert fine < 0.5 * coarse
