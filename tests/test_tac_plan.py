"""The TAC plan: which layers (N * divisor >= H * W) and which steps."""

from __future__ import annotations

import pytest

from r2r.models import SD15_UNET_CONFIG
from r2r.tac import plan_tac, self_attention_layers, tac_window

LEVEL01 = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
]


def test_sd15_at_768x1024_divisor_256_selects_the_ten_level_0_and_1_layers() -> None:
    plan = plan_tac(SD15_UNET_CONFIG, 768, 1024, 256)
    assert list(plan.names) == LEVEL01
    assert [lyr.tokens for lyr in plan.layers] == [12288] * 2 + [3072] * 2 + [3072] * 3 + [12288] * 3
    assert [lyr.channels for lyr in plan.layers] == [320] * 2 + [640] * 5 + [320] * 3


def test_sd15_at_768x1024_divisor_64_selects_only_the_five_level_0_layers() -> None:
    plan = plan_tac(SD15_UNET_CONFIG, 768, 1024, 64)
    assert list(plan.names) == [n for n in LEVEL01 if n.startswith(("down_blocks.0", "up_blocks.3"))]


def test_sd15_has_sixteen_self_attention_layers_in_execution_order() -> None:
    layers = self_attention_layers(SD15_UNET_CONFIG, 512, 512)
    names = [lyr.name for lyr in layers]
    assert len(names) == 16
    assert names.index("mid_block.attentions.0.transformer_blocks.0.attn1") == 6
    assert names[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn1"


def test_a_huge_divisor_reaches_the_mid_block() -> None:
    plan = plan_tac(SD15_UNET_CONFIG, 512, 512, 10**6)
    assert len(plan.layers) == 16


def test_odd_latent_sizes_round_up_like_the_strided_convolutions() -> None:
    layers = self_attention_layers(SD15_UNET_CONFIG, 8 * 13, 8 * 10)
    assert {lyr.level: lyr.tokens for lyr in layers} == {0: 130, 1: 35, 2: 12, 3: 4}


@pytest.mark.parametrize(("n", "ratio", "window"), [(15, 0.9, 13), (15, 0.0, 0), (15, 1.0, 15), (10, 0.55, 5)])
def test_tac_window_is_int_of_n_times_ratio(n: int, ratio: float, window: int) -> None:
    assert tac_window(n, ratio) == window


def test_resolution_not_multiple_of_8_is_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_tac(SD15_UNET_CONFIG, 250, 256, 256)
