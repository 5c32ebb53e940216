"""The TAC processor on a real UNet: plain mode is the default attention, the modes route Q/K."""

from __future__ import annotations

import copy

import pytest
import torch

from r2r.tac import TACMode, install_tac, pixel_multiple, plan_tac, self_attention_layers
from r2r.tiny import LATENT_CHANNELS as C


@pytest.fixture()
def unet(tiny_components):
    return copy.deepcopy(tiny_components.unet)


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, 32, 32, generator=g), torch.tensor(261), torch.randn(batch, 77, 64, generator=g)


def test_plan_token_counts_match_what_the_tiny_unet_computes(unet) -> None:
    seen: dict[str, int] = {}
    hooks = [mod.to_q.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.shape[1]))
             for name, mod in unet.named_modules() if name.endswith("attn1")]
    with torch.no_grad():
        unet(*_inputs(1)[:2], encoder_hidden_states=_inputs(1)[2])
    for h in hooks:
        h.remove()
    planned = {lyr.name: lyr.tokens for lyr in self_attention_layers(unet.config, 256, 256)}
    assert planned == seen
    assert [lyr.level for lyr in plan_tac(unet.config, 256, 256, 256).layers] == [0, 1, 1, 1, 0, 0]


def test_plain_mode_is_bit_identical_to_the_default_processor(unet) -> None:
    z, t, c = _inputs(2)
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=c).sample
        install_tac(unet, plan_tac(unet.config, 256, 256, 256))
        after = unet(z, t, encoder_hidden_states=c).sample
    assert torch.equal(before, after)


def _capture_then_inject(unet, state):
    """A cg pass on zc that captures, then the [neg, null] pair on zr with the captured Q/K injected."""
    zc, t, c_null = _inputs(1, 1)
    zr, _, c_neg = _inputs(1, 2)
    with torch.no_grad():
        state.mode = TACMode.CAPTURE
        unet(zc, t, encoder_hidden_states=c_null)
        state.injected = state.take_captured()
        state.mode = TACMode.INJECT
        pair = unet(torch.cat([zr, zr]), t, encoder_hidden_states=torch.cat([c_neg, c_null])).sample
    return zc, t, c_null, zr, c_neg, pair


def test_fused_batch_equals_capture_then_inject(unet) -> None:
    state = install_tac(unet, plan_tac(unet.config, 256, 256, 256))
    zc, t, c_null, zr, c_neg, pair = _capture_then_inject(unet, state)
    with torch.no_grad():
        state.mode = TACMode.FUSED
        fused = unet(torch.cat([zc, zr, zr]), t, encoder_hidden_states=torch.cat([c_null, c_neg, c_null])).sample
        state.mode = TACMode.OFF
        plain = unet(torch.cat([zr, zr]), t, encoder_hidden_states=torch.cat([c_neg, c_null])).sample
    torch.testing.assert_close(fused[1:], pair, rtol=1e-5, atol=1e-5)
    assert (pair[1] - plain[1]).abs().max() > 1e-4  # the null pass is controlled
    torch.testing.assert_close(pair[0], plain[0], rtol=1e-5, atol=1e-5)  # negative pass is not


def test_capture_returns_projections_before_the_head_split(unet) -> None:
    plan = plan_tac(unet.config, 256, 256, 256)
    state = install_tac(unet, plan)
    state.mode = TACMode.CAPTURE
    with torch.no_grad():
        unet(*_inputs(3)[:2], encoder_hidden_states=_inputs(3)[2])
    qk = state.take_captured()
    assert [tuple(q.shape) for q, _ in qk] == [(3, lyr.tokens, lyr.channels) for lyr in plan.layers]
    assert [tuple(k.shape) for _, k in qk] == [(3, lyr.tokens, lyr.channels) for lyr in plan.layers]


def test_one_plan_serves_every_size_that_is_a_multiple_of_the_pixel_multiple(unet) -> None:
    """At sides that are multiples of the pixel multiple a layer's tokens are H*W / (64 * 4**level), so the plan's
    layers are a property of their level: the same at every such size."""
    m = pixel_multiple(unet.config)
    assert m == 32  # three levels: 8 * 2**2
    names = [lyr.name for lyr in plan_tac(unet.config, 256, 256, 256).layers]
    for w, h in ((64, 64), (256, 96), (320, 224), (1024, 2048)):
        assert [lyr.name for lyr in plan_tac(unet.config, w, h, 256).layers] == names, (w, h)
    assert [lyr.name for lyr in plan_tac(unet.config, 256, 256, 64).layers] != names  # the divisor does matter


def test_replanning_returns_dropped_layers_to_plain_attention(unet) -> None:
    install_tac(unet, plan_tac(unet.config, 256, 256, 256))
    install_tac(unet, plan_tac(unet.config, 256, 256, 64))
    kinds = {k: type(v).__name__ for k, v in unet.attn_processors.items() if ".attn1." in k}
    assert sum(v == "TACProcessor" for v in kinds.values()) == 3


def _pooled_attention(attn, x: torch.Tensor, h: int, w: int, pool: int) -> torch.Tensor:
    """An independent first-level self-attention with keys and values from the pool x pool average of the token grid
    (heads split by hand, softmax written out)."""
    b, n, c = x.shape
    grid = x.reshape(b, h, w, c).reshape(b, h // pool, pool, w // pool, pool, c).mean(dim=(2, 4)).reshape(b, -1, c)
    heads = attn.heads
    q = attn.to_q(x).reshape(b, n, heads, -1).transpose(1, 2)
    k = attn.to_k(grid).reshape(b, grid.shape[1], heads, -1).transpose(1, 2)
    v = attn.to_v(grid).reshape(b, grid.shape[1], heads, -1).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.mark.parametrize("pool", [2, 4])
def test_attention_pool_takes_first_level_keys_and_values_from_the_pooled_grid(unet, pool: int) -> None:
    """On a 256x192 latent grid (not square: a transposed grid would differ) every first-level attn1 equals the
    independent pooled attention; deeper levels are untouched."""
    install_tac(unet, plan_tac(unet.config, 256, 192, 256, pool))
    g = torch.Generator().manual_seed(5)
    z, t, c = torch.randn(2, C, 24, 32, generator=g), torch.tensor(301), torch.randn(2, 77, 64, generator=g)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    attns = {name: mod for name, mod in unet.named_modules() if name.endswith("attn1")}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
             for name, mod in attns.items()]
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=c)
        for h in hooks:
            h.remove()
        levels = {lyr.name: lyr.level for lyr in self_attention_layers(unet.config, 256, 192)}
        for name, (x, out) in seen.items():
            if levels[name] == 0:
                torch.testing.assert_close(out, _pooled_attention(attns[name], x, 24, 32, pool), rtol=1e-4, atol=1e-5)
            else:
                plain = _pooled_attention(attns[name], x, x.shape[1], 1, 1)
                torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


def test_attention_pool_hands_the_pooled_key_to_the_controlled_pass(unet) -> None:
    """Routed TAC with a pool: the fused step's null third equals capture-then-inject of the pooled Q/K, and the
    captured keys are the pooled grid's (tokens / pool**2 at the first level)."""
    plan = plan_tac(unet.config, 256, 256, 256, 2)
    state = install_tac(unet, plan)
    zc, t, c_null, zr, c_neg, pair = _capture_then_inject(unet, state)
    assert [k.shape[1] for _, k in state.injected] == [
        lyr.tokens // 4 if lyr.level == 0 else lyr.tokens for lyr in plan.layers]
    with torch.no_grad():
        state.mode, state.src = TACMode.ROUTED, torch.tensor([0, 1, 0])
        routed = unet(torch.cat([zc, zr, zr]), t, encoder_hidden_states=torch.cat([c_null, c_neg, c_null])).sample
    torch.testing.assert_close(routed[1:], pair, rtol=1e-5, atol=1e-5)


def test_a_pool_of_one_is_the_plain_processor_and_reinstalling_drops_the_grid_hook(unet) -> None:
    z, t, c = _inputs(2)
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=c).sample
        install_tac(unet, plan_tac(unet.config, 256, 256, 256, 2))
        pooled = unet(z, t, encoder_hidden_states=c).sample
        install_tac(unet, plan_tac(unet.config, 256, 256, 256, 1))
        after = unet(z, t, encoder_hidden_states=c).sample
    assert torch.equal(before, after) and not unet._forward_pre_hooks
    assert (pooled - before).abs().max() > 1e-4
    with pytest.raises(ValueError, match="power of two"):
        plan_tac(unet.config, 256, 256, 256, 3)
