"""An SD 1.5-architecture model directory with seeded random weights (nothing is downloaded).

Same UNet, VAE and text-encoder shapes as Stable Diffusion 1.5, so its graphs cost what SD 1.5's
cost; the tokenizer is the tiny family's (its vocabulary does not change any timing).
"""

from __future__ import annotations

import json
from pathlib import Path

from r2r.models import EMBEDDING_FILE, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from r2r.tiny import scheduler_kwargs


def build_sd15_architecture(out: Path, seed: int = 0, width: int = 256, height: int = 256) -> Path:
    """Write the directory once (a complete one is reused); returns it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from r2r.tiny import build_tokenizer

    if (out / "model_index.json").is_file() and (out / EMBEDDING_FILE).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok_dir = out / ".tokenizer-build"
    tokenizer = build_tokenizer(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG, vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE_CONFIG), text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG), scheduler=DDIMScheduler(**scheduler_kwargs()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "r2r_defaults.json").write_text(json.dumps({"width": width, "height": height}))
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(75, SD15_TEXT_CONFIG["hidden_size"], generator=g) * 0.02
    save_file({"<rendered>": emb}, str(out / EMBEDDING_FILE))
    return out
