"""Step caching (DeepCache, Ma et al. 2024; docs/design.md, "Less work per image"): the UNet split at its last up
block, so that a call can keep the features entering that block (`deep`) and later calls can run only the first
level on them.

One definition of the split (`unet_split`) serves the PyTorch reference, the torch backend and the exported
`unet_deep` / `unet_shallow` graphs, and one definition of the cadence (`full_calls`) serves the reference and the
scheduler. The shallow path is conv_in, the first down block's layers (not its downsampler), the last up block and
the output convolution: the first level, where a TAC plan's highest-resolution layers are; their Q/K routing runs
as in a whole call. The deeper TAC layers act on the cached features, as they did in the call that made them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the scheduler reads the cadence without importing torch
    import torch

    from r2r.tac import TACPlan

# The UNet settings the split reimplements diffusers' forward for (SD 1.x); anything else is refused, not guessed.
_PLAIN = {"class_embed_type": None, "addition_embed_type": None, "time_cond_proj_dim": None,
          "encoder_hid_dim_type": None, "center_input_sample": False}


def full_calls(calls: int, interval: int) -> tuple[bool, ...]:
    """Which of a branch's calls, in the order they run, evaluate the whole UNet (and refresh its cache): the first
    and every `interval`-th after it; the others run the shallow path. Interval 1: every call is whole (the
    interval is validated where it is given, `Method`)."""
    return tuple(c % interval == 0 for c in range(calls))


def check_unet(unet_config: Mapping[str, Any]) -> None:
    """Refuse a UNet the split does not reproduce (the SD 1.x family: no class or added embeddings, two levels at
    least, the last up block taking the first down block's outputs)."""
    odd = [k for k, v in _PLAIN.items() if unet_config.get(k, v) != v]
    if odd:
        raise ValueError(f"step caching supports SD 1.x-family UNets; this one sets {', '.join(odd)}")
    if len(unet_config["block_out_channels"]) < 2:
        raise ValueError("step caching needs a UNet of two levels at least")


def step_cache_supported(unet_config: Mapping[str, Any]) -> bool:
    """Whether `check_unet` accepts the UNet (a bundle of any model records step caching's shapes only then)."""
    try:
        check_unet(unet_config)
    except ValueError:
        return False
    return True


def deep_channels(unet_config: Mapping[str, Any]) -> int:
    """Channels of the cached features: the output of the second-to-last up block, at the second level's width."""
    return int(unet_config["block_out_channels"][1])


def shallow_prefixes(unet_config: Mapping[str, Any]) -> tuple[str, str]:
    """Module-name prefixes of the blocks the shallow path runs."""
    return "down_blocks.0.", f"up_blocks.{len(unet_config['up_block_types']) - 1}."


def shallow_layers(plan: TACPlan, unet_config: Mapping[str, Any]) -> frozenset[int]:
    """Indices of the plan's TAC layers that a shallow call computes (the others are in the cached features)."""
    prefixes = shallow_prefixes(unet_config)
    return frozenset(i for i, layer in enumerate(plan.layers) if layer.name.startswith(prefixes))


def _first_level(block: torch.nn.Module, h: torch.Tensor, emb: torch.Tensor, ehs: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first down block's resnets (and attentions) as diffusers runs them, without its downsampler."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    outs: tuple[torch.Tensor, ...] = ()
    for resnet, attn in zip(block.resnets, attentions, strict=True):
        h = resnet(h, emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
        outs += (h,)
    return h, outs


def _up(block: torch.nn.Module, h: torch.Tensor, emb: torch.Tensor, res: tuple[torch.Tensor, ...],
        ehs: torch.Tensor) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs,
                     upsample_size=None)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=None)


def unet_split(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
               deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, deep) of an SD 1.x UNet: with `deep` None, the whole UNet (the same operations as its forward, at sides
    that are multiples of its pixel multiple) and the features entering its last up block; with `deep`, the shallow
    path on those features. The shallow call returns the `deep` it was given."""
    u: Any = unet
    emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
    if u.time_embed_act is not None:
        emb = u.time_embed_act(emb)
    h = u.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (h,)
    first = u.down_blocks[0]
    h, outs = _first_level(first, h, emb, ehs)
    skips += outs
    last = u.up_blocks[-1]
    if len(skips) != len(last.resnets):
        raise ValueError("step caching: the last up block does not take the first down block's outputs alone")
    if deep is None:
        res = skips
        if first.downsamplers is not None:
            for down in first.downsamplers:
                h = down(h)
            res += (h,)
        for block in u.down_blocks[1:]:
            if getattr(block, "has_cross_attention", False):
                h, more = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, more = block(hidden_states=h, temb=emb)
            res += more
        if u.mid_block is not None:
            cross = getattr(u.mid_block, "has_cross_attention", False)
            h = u.mid_block(h, emb, encoder_hidden_states=ehs) if cross else u.mid_block(h, emb)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            h, res = _up(block, h, emb, res[-n:], ehs), res[:-n]
        deep = h
    h = _up(last, deep, emb, skips, ehs)
    if u.conv_norm_out is not None:
        h = u.conv_act(u.conv_norm_out(h))
    return u.conv_out(h), deep
