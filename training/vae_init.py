"""A colour-carrying start for the tiny VAE: at step 0 it already encodes each 8x8 block's mean colour.

`carrier_init(vae)` rewrites the weights in place: a linear carrier path through the main path of encoder and
decoder (the latent's first three channels are the block means), every residual branch and attention output zeroed,
every other weight at its random init; a VAE whose norms or blocks cannot pass the carrier is refused.
Why: docs/design.md, "Training the embedded default".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["carrier_init"]

CONSTANT = 5.0  # the carrier groups' constant channels: the norm's gain error is ~mean(s^2) / (2 C^2)
LOGVAR = -8.0  # the posterior's initial log-variance (unit noise would drown an untrained latent)


def carrier_init(vae: nn.Module) -> None:
    """Rewrite `vae`'s weights in place as docs/design.md, "Training the embedded default", describes."""
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    enc, dec = vae.encoder, vae.decoder
    groups = enc.conv_norm_out.num_groups
    c_enc = enc.conv_norm_out.num_channels // groups  # channels per group at the encoder's last norm
    c_dec = dec.conv_norm_out.num_channels // groups
    if c_enc < 8 or c_dec < 4:
        raise ValueError(f"carrier_init needs >= 8 channels per group in the encoder's last norm and >= 4 in "
                         f"the decoder's (got {c_enc}, {c_dec}); lower norm_num_groups")
    # Encoder layout: group 0 = [sR, -sR, sG, -sG, sB, -sB, C, -C]; decoder: group k = [s_k, -s_k, C, -C].
    enc_pos = [(2 * k, 2 * k + 1) for k in range(3)]
    enc_const = (6, 7)
    dec_pos = [(c_dec * k, c_dec * k + 1) for k in range(3)]
    dec_const = [(c_dec * k + 2, c_dec * k + 3) for k in range(3)]

    def carrier_rows(conv: torch.nn.Conv2d, pos: list[tuple[int, int]], taps: list[tuple[int, int, float]],
                     const: list[tuple[int, int]], src: list[tuple[int, int]] | None = None) -> None:
        """Carrier outputs read only their own carrier input at `taps`; constant rows are bias only."""
        src = src if src is not None else pos
        for (p, n), (sp, sn) in zip(pos, src, strict=True):
            for row, col in ((p, sp), (n, sn)):
                conv.weight[row].zero_()
                conv.bias[row] = 0.0
                for a, b, w in taps:
                    conv.weight[row, col, a, b] = w
        for cp, cn in const:
            conv.weight[cp].zero_()
            conv.weight[cn].zero_()
            conv.bias[cp], conv.bias[cn] = CONSTANT, -CONSTANT

    centre = [(1, 1, 1.0)]
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif isinstance(m, Attention):
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
        # --- encoder: x -> (s, -s) carriers, 2x2 means per downsampler
        _split_into_carriers(enc.conv_in, enc_pos)
        for block in enc.down_blocks:
            for r in block.resnets:
                if r.conv_shortcut is not None:
                    carrier_rows(r.conv_shortcut, enc_pos, [(0, 0, 1.0)], [enc_const])
            for ds in block.downsamplers or []:
                carrier_rows(ds.conv, enc_pos, [(a, b, 0.25) for a in (0, 1) for b in (0, 1)], [enc_const])
        _check_no_shortcut(enc.mid_block)
        norm = enc.conv_norm_out
        _linear_norm(norm, [i for pair in enc_pos for i in pair], c_enc)
        conv = enc.conv_out  # [mean(latent_channels), logvar(latent_channels)]
        lat = conv.out_channels // 2
        _read_carriers(conv, enc_pos)
        conv.bias[lat:] = LOGVAR
        if vae.quant_conv is not None:
            _identity_1x1(vae.quant_conv)
        # --- decoder: latent -> (s, -s) carriers, nearest upsampling, carriers -> RGB
        if vae.post_quant_conv is not None:
            _identity_1x1(vae.post_quant_conv)
        _split_into_carriers(dec.conv_in, dec_pos)
        _check_no_shortcut(dec.mid_block)
        for block in dec.up_blocks:
            for r in block.resnets:
                if r.conv_shortcut is not None:
                    carrier_rows(r.conv_shortcut, dec_pos, [(0, 0, 1.0)], dec_const)
            for up in block.upsamplers or []:
                carrier_rows(up.conv, dec_pos, centre, dec_const)
        # the constants must be present at the last norm even if the last block has no shortcut
        last = dec.up_blocks[-1]
        if last.resnets[0].conv_shortcut is None:
            raise ValueError("carrier_init: the decoder's last block must change width (its shortcut sets C)")
        _linear_norm(dec.conv_norm_out, [i for pair in dec_pos for i in pair], c_dec)
        _read_carriers(dec.conv_out, dec_pos)


def _split_into_carriers(conv: nn.Conv2d, pos: list[tuple[int, int]]) -> None:
    """Input channel k enters carrier pair pos[k] as (x_k, -x_k) at the centre tap."""
    for k, (p, n) in enumerate(pos):
        conv.weight[p].zero_()
        conv.weight[n].zero_()
        conv.weight[p, k, 1, 1], conv.weight[n, k, 1, 1] = 1.0, -1.0
        conv.bias[p] = conv.bias[n] = 0.0


def _read_carriers(conv: nn.Conv2d, pos: list[tuple[int, int]]) -> None:
    """Output channel k = SiLU(s_k) - SiLU(-s_k) = s_k; every other weight and bias zero."""
    conv.weight.zero_()
    conv.bias.zero_()
    for k, (p, n) in enumerate(pos):
        conv.weight[k, p, 1, 1], conv.weight[k, n, 1, 1] = 1.0, -1.0


def _linear_norm(norm: nn.GroupNorm, carriers: list[int], per_group: int) -> None:
    """gamma = the group's std (C sqrt(2 / per_group)), beta = 0 on the carrier channels."""
    import math

    gamma = CONSTANT * math.sqrt(2.0 / per_group)
    for i in carriers:
        norm.weight[i] = gamma
        norm.bias[i] = 0.0


def _identity_1x1(conv: nn.Conv2d) -> None:
    import torch

    conv.weight.zero_()
    conv.bias.zero_()
    n = min(conv.in_channels, conv.out_channels)
    conv.weight[:n, :n, 0, 0] = torch.eye(n)


def _check_no_shortcut(mid: nn.Module) -> None:
    for r in mid.resnets:
        if r.conv_shortcut is not None:
            raise ValueError("carrier_init: the mid block changes width; the carrier cannot pass it")
