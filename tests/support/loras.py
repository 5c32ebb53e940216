"""LoRA files for the tests: random rank-4 adapters (so the update is not zero) saved in diffusers' layout."""

from __future__ import annotations

from pathlib import Path

import torch


def unet_lora(folder: Path, seed: int, model: Path | None = None) -> Path:
    """A rank-4 LoRA on the UNet's attention projections of `model` (default: the embedded default); its file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from r2r.models import EMBEDDED_DEFAULT

    pipe = StableDiffusionPipeline.from_pretrained(model or EMBEDDED_DEFAULT, local_files_only=True,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


__all__ = ["unet_lora"]
