"""The method (docs/design.md, "The method") written directly on diffusers objects, sharing no code with r2r's method
modules: diffusers' DDIMScheduler steps the generation, conditioning comes from diffusers' own textual-inversion
loading and prompt encoding, the TAC layers are found by measuring token counts, and Q/K are swapped by forward hooks
on the to_q/to_k projections rather than by an attention processor. With a prompt, the two-term guidance
(docs/design.md, "Prompts") as three separate UNet passes and the formula by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from r2r.config import Method

W = H = 256


def render_image(seed: int) -> np.ndarray:
    """A render-like test image: flat colours with fine stripes on white."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 255, np.uint8)
    yy, xx = np.mgrid[:H, :W]
    mask = ((yy - 128) / 90.0) ** 2 + ((xx - 128) / 70.0) ** 2 < 1
    a, b = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    stripes = ((xx + yy) // rng.integers(3, 8)) % 2 == 0
    img[mask & stripes] = a
    img[mask & ~stripes] = b
    return img


class Independent:
    """The method (docs/design.md) written directly on diffusers objects."""

    def __init__(self, model_dir: Path, embedding: Path, dtype: torch.dtype = torch.float32) -> None:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, local_files_only=True,
                                                       torch_dtype=dtype)
        pipe.load_textual_inversion(str(embedding), token="<rendered>")
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        with torch.no_grad():
            self.c_null = pipe.encode_prompt("", "cpu", 1, False)[0]
            self.c_neg = pipe.encode_prompt("<rendered>", "cpu", 1, False)[0]
        self.q_out: dict[str, torch.Tensor] = {}
        self.k_out: dict[str, torch.Tensor] = {}
        self.mode = "off"

    def tac_layers(self, divisor: int) -> list[str]:
        tokens: dict[str, int] = {}
        hooks = []
        for name, mod in self.unet.named_modules():
            if name.endswith("attn1"):
                hooks.append(mod.to_q.register_forward_hook(
                    lambda m, i, o, name=name: tokens.__setitem__(name, o.shape[1])))
        with torch.no_grad():
            z = torch.zeros(1, self.unet.config.in_channels, H // 8, W // 8, dtype=self.unet.dtype)
            self.unet(z, 1, encoder_hidden_states=self.c_null)
        for h in hooks:
            h.remove()
        return [n for n, t in tokens.items() if t * divisor >= H * W]

    def _hook(self, name: str, store: dict[str, torch.Tensor]):
        def hook(module, inputs, output):
            if self.mode == "capture":
                store[name] = output
                return output
            if self.mode == "inject":
                return torch.cat([output[:1], store[name]])
            if self.mode == "replace":  # a one-row pass under TAC
                return store[name]
            return output
        return hook

    def _pass(self, zr: torch.Tensor, t: int, cond: torch.Tensor, controlled: bool) -> torch.Tensor:
        self.mode = "replace" if controlled else "off"
        try:
            return self.unet(zr, t, encoder_hidden_states=cond).sample
        finally:
            self.mode = "off"

    @torch.no_grad()
    def __call__(self, image: np.ndarray, m: Method, return_latents: bool = False, single_pass: bool = False,
                 prompt: str | None = None):
        handles = []
        for name in self.tac_layers(m.divisor):
            attn = self.unet.get_submodule(name)
            handles.append(attn.to_q.register_forward_hook(self._hook(name, self.q_out)))
            handles.append(attn.to_k.register_forward_hook(self._hook(name, self.k_out)))
        try:
            c_text = None if prompt is None else self.pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            x = torch.from_numpy(image).permute(2, 0, 1)[None].to(self.unet.dtype).contiguous() / 127.5 - 1
            z0 = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
            sch = DDIMScheduler.from_config(self.pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
            sch.set_timesteps(m.steps)
            n = min(int(m.steps * m.strength), m.steps)
            ts = sch.timesteps[m.steps - n:]
            d = sch.config.num_train_timesteps // m.steps
            window = int(n * m.tac_ratio)

            def a(t: int) -> torch.Tensor:
                return sch.alphas_cumprod[t] if t >= 0 else sch.final_alpha_cumprod

            z, inv, kept = z0, {}, {}
            if single_pass:  # eps of each step = the UNet at the previous latent and its own timestep
                e = self.unet(z, max(int(ts[-1]) - d, 0), encoder_hidden_states=self.c_null).sample
            for t in reversed(ts.tolist()):
                if not single_pass:
                    e = self.unet(z, t, encoder_hidden_states=self.c_null).sample
                x0 = (z - (1 - a(t - d)) ** 0.5 * e) / a(t - d) ** 0.5
                z = a(t) ** 0.5 * x0 + (1 - a(t)) ** 0.5 * e
                inv[t] = z
                step = ts.tolist().index(t)
                if single_pass and step < window:
                    self.mode = "capture"
                    e = self.unet(z, t, encoder_hidden_states=self.c_null).sample
                    kept[t] = (dict(self.q_out), dict(self.k_out))
                    self.mode = "off"
                elif single_pass and step > 0:
                    e = self.unet(z, t, encoder_hidden_states=self.c_null).sample
            zr = inv[int(ts[0])]
            for i, t in enumerate(ts.tolist()):
                if i < window and single_pass:
                    self.q_out.update(kept[t][0])
                    self.k_out.update(kept[t][1])
                    self.mode = "inject"
                elif i < window:
                    self.mode = "capture"
                    self.unet(inv[t], t, encoder_hidden_states=self.c_null)
                    self.mode = "inject"
                if prompt is not None:  # three passes: neg free, null under TAC, text as m.text_tac says
                    tac = self.mode == "inject"
                    e_neg = self._pass(zr, t, self.c_neg, False)
                    e_null = self._pass(zr, t, self.c_null, tac)
                    e_text = self._pass(zr, t, c_text, tac and m.text_tac)
                    e = e_neg + m.guidance * (e_null - e_neg) + m.text_guidance * (e_text - e_null)
                    zr = sch.step(e, t, zr).prev_sample
                    continue
                out = self.unet(torch.cat([zr, zr]), t, encoder_hidden_states=torch.cat([self.c_neg, self.c_null]))
                self.mode = "off"
                e_neg, e_null = out.sample.chunk(2)
                zr = sch.step(e_neg + m.guidance * (e_null - e_neg), t, zr).prev_sample
            img = self.vae.decode(zr / self.vae.config.scaling_factor).sample
            u8 = (img / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
            return (u8, zr) if return_latents else u8
        finally:
            for h in handles:
                h.remove()
