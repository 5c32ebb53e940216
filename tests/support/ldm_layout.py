"""Write a diffusers SD 1.x model as one checkpoint in the original LDM layout (what A1111, ComfyUI and kohya save),
for the tests of r2r.checkpoints: its loader must give back the same weights. Written from the layout itself
(CompVis' module names), for any UNet / VAE depth the config gives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table: dict[str, str]) -> str:
    part, _, tail = rest.partition(".")
    return f"{table.get(part, part)}.{tail}"


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    n = layers_per_block + 1  # LDM slots per down level: resnets (+ attention) then the downsampler
    out: dict[str, torch.Tensor] = {}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in sd.items():
        name = None
        for d, ldm in top.items():
            if key.startswith(d + "."):
                name = ldm + key[len(d):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = f"input_blocks.{i * n + j + 1}"
            name = f"{slot}.0.{_resnet(rest, RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = f"output_blocks.{i * n + j}"
            name = f"{slot}.0.{_resnet(rest, RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
            name = f"output_blocks.{i * n + layers_per_block}.{2 if has_attention else 1}.conv.{m[2]}"
        if name is None:
            raise KeyError(f"no LDM name for UNet tensor {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m[1])  # LDM numbers the decoder's levels from the bottom
            name = f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            name = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            name = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            name = f"{m[1]}.norm_out.{m[2]}"
        out["first_stage_model." + name] = value
    return out


def text_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in flat.items()}


def write_ldm_checkpoint(components: Any, path: Path, dtype: torch.dtype | None = None) -> Path:
    """`components` (r2r.models.Components, or anything with unet / vae / text_encoder) as one LDM .safetensors."""
    from safetensors.torch import save_file

    state = {**unet_to_ldm(components.unet.state_dict(), components.unet.config.layers_per_block),
             **vae_to_ldm(components.vae.state_dict(), len(components.vae.config.block_out_channels)),
             **text_to_ldm(components.text_encoder.state_dict())}
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return path
