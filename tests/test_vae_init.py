"""The colour-carrying start of the tiny VAE (r2r.training.vae_init)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _vae(**overrides: object) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    from r2r.tiny import TINY_VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY_VAE_CONFIG.kwargs(), **overrides}).eval()


def test_carrier_init_encodes_each_8x8_block_mean_and_decodes_it_back() -> None:
    from r2r.training.vae_init import carrier_init

    vae = _vae()
    carrier_init(vae)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1  # a blocky image: every 8x8 block one colour
    x = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        y = vae.decode(post.mean).sample
    assert (post.mean[:, :3] - blocks).abs().max() < 0.06  # the norms' gain error is ~mean(s^2)/(2 C^2)
    assert post.mean[:, 3].abs().max() == 0  # the fourth channel starts free
    assert post.std.max() < 0.05
    assert (y - x).abs().max() < 0.1
    # a random init reconstructs nothing of the kind
    with torch.no_grad():
        y0 = _vae().decode(_vae().encode(x).latent_dist.mean).sample
    assert (y0 - x).abs().mean() > 5 * (y - x).abs().mean()


def test_carrier_init_refuses_norm_groups_too_small_to_carry_colour() -> None:
    from r2r.training.vae_init import carrier_init

    with pytest.raises(ValueError, match="norm_num_groups"):
        carrier_init(_vae(norm_num_groups=16))
