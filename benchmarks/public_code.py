"""The `public-code` baseline: FashionR2R as the paper's public diffusers script runs it.

Reimplemented from the description in docs/design.md ("UNet evaluations per image"), for timing side by side
at equal parameters: PyTorch eager; inversion with classifier-free guidance of "" against "" (a batch of 2
per step); generation on the batch [neg_ref, neg_cur, null_ref, null_cur] (4 per step, the reference
branch's negative pass thrown away) with attention processors that give null_cur the Q/K of null_ref in the
TAC layers; its own DDIM loop. 90 UNet evaluations per image at the defaults.

One deliberate difference: docs/design.md records that the script walks the inversion timesteps in
descending order; this baseline walks them ascending like r2r, which costs exactly the same and keeps
its pictures comparable to ours (its fidelity column then measures only precision and batching).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from r2r.config import Method
from r2r.imageio import to_model_input
from r2r.models import Components, encode_conditioning
from r2r.schedule import alphas_cumprod, inference_timesteps
from r2r.tac import plan_tac


class _SwapProcessor:
    """Self-attention in which, while active, the 4th quarter of the batch takes the 3rd's Q and K."""

    def __init__(self, switch: dict[str, bool]) -> None:
        self.switch = switch

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.switch["on"]:
            quarter = b // 4
            q = torch.cat([q[: 3 * quarter], q[2 * quarter : 3 * quarter]])
            k = torch.cat([k[: 3 * quarter], k[2 * quarter : 3 * quarter]])
        h = attn.heads
        q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class PublicCodePipeline:
    def __init__(self, components: Components, embedding: str | Path, width: int, height: int,
                 tac_divisor: int = 256) -> None:
        self.c = components
        self.width, self.height = width, height
        dev, dt = components.unet.device, components.unet.dtype
        self.c_null, self.c_neg = (c.to(dev, dt) for c in encode_conditioning(components, embedding))
        self.switch = {"on": False}
        plan = plan_tac(components.unet.config, width, height, tac_divisor)
        procs = dict(components.unet.attn_processors)
        for layer in plan.layers:
            procs[layer.processor_key] = _SwapProcessor(self.switch)
        components.unet.set_attn_processor(procs)
        self.evaluations = 0
        self.images = 0

    def _unet(self, z: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        self.evaluations += z.shape[0]
        return self.c.unet(z, t, encoder_hidden_states=cond).sample

    @torch.no_grad()
    def encode(self, img: np.ndarray) -> torch.Tensor:
        unet = self.c.unet
        x = torch.from_numpy(to_model_input(img))[None].to(unet.device, unet.dtype)
        return self.c.vae.encode(x).latent_dist.mean * self.c.scaling_factor

    def _schedule(self, m: Method) -> tuple[list[int], int, torch.Tensor]:
        cfg = self.c.scheduler
        n = min(int(m.steps * m.strength), m.steps)
        ts = [int(t) for t in inference_timesteps(cfg, m.steps)[m.steps - n :]]
        return ts, cfg.num_train_timesteps // m.steps, torch.from_numpy(alphas_cumprod(cfg))

    @torch.no_grad()
    def invert(self, z: torch.Tensor, m: Method) -> dict[int, torch.Tensor]:
        ts, stride, ac = self._schedule(m)
        uncond = torch.cat([self.c_null, self.c_null])
        inverted: dict[int, torch.Tensor] = {}
        for t in reversed(ts):
            e_u, e_c = self._unet(torch.cat([z, z]), t, uncond).chunk(2)
            e = e_u + m.guidance * (e_c - e_u)
            a_from, a_to = (ac[t - stride] if t - stride >= 0 else ac[0]), ac[t]
            x0 = (z - (1 - a_from) ** 0.5 * e) / a_from**0.5
            z = a_to**0.5 * x0 + (1 - a_to) ** 0.5 * e
            inverted[t] = z
        return inverted

    @torch.no_grad()
    def generate(self, inverted: dict[int, torch.Tensor], m: Method) -> torch.Tensor:
        ts, stride, ac = self._schedule(m)
        zr = inverted[ts[0]]
        conds = torch.cat([self.c_neg, self.c_neg, self.c_null, self.c_null])
        window = int(len(ts) * m.tac_ratio)
        for i, t in enumerate(ts):
            ref = inverted[t]
            self.switch["on"] = i < window
            try:
                out = self._unet(torch.cat([ref, zr, ref, zr]), t, conds)
            finally:
                self.switch["on"] = False
            e_neg, e_null = out[1:2], out[3:4]
            e = e_neg + m.guidance * (e_null - e_neg)
            a_t, a_prev = ac[t], (ac[t - stride] if t - stride >= 0 else ac[0])
            x0 = (zr - (1 - a_t) ** 0.5 * e) / a_t**0.5
            zr = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e
        return zr

    @torch.no_grad()
    def decode(self, zr: torch.Tensor) -> np.ndarray:
        dec = self.c.vae.decode(zr / self.c.scaling_factor).sample
        return (dec.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()

    def __call__(self, images: list[np.ndarray], m: Method) -> list[np.ndarray]:
        """One image at a time, as the script does."""
        self.images += len(images)
        return [self.decode(self.generate(self.invert(self.encode(img), m), m)) for img in images]
