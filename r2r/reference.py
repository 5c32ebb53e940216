"""The PyTorch reference of Realistic Image Generation (docs/design.md, "The method"): the oracle.

Written for clarity and exactness, not speed: inversion with the empty prompt (one pass per step),
then generation with negative-embedding guidance against null text, TAC on the null pass in the
window (cg pass with capture, then the [neg, null] pass with injection). Both inversion variants of
the runtime are here (`invert`, `invert_single_pass`), so every fast path has an oracle. It lives in
r2r/ because training's evaluation runs it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from r2r.config import Inversion, Method
from r2r.imageio import to_model_input
from r2r.models import Components, encode_conditioning, load_embedding
from r2r.prompts import ConditioningCache, text_weights
from r2r.schedule import Schedule, ddim_transfer, guide, make_schedule
from r2r.step_cache import full_calls, shallow_layers, unet_split
from r2r.tac import TACMode, TACPlan, TACState, install_tac, plan_tac, tac_window


@dataclass
class EvalCount:
    """UNet evaluations: every latent of every UNet batch counts one."""

    evaluations: int = 0
    images: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, latents: int) -> None:
        self.evaluations += latents
        self.by_stage[stage] = self.by_stage.get(stage, 0) + latents

    @property
    def per_image(self) -> float:
        return self.evaluations / max(self.images, 1)


@dataclass
class Branch:
    """One branch's step cache (docs/design.md, "Less work per image"): which of its calls are whole, how many ran,
    and the deep features of its last whole call."""

    whole: tuple[bool, ...]
    calls: int = 0
    deep: torch.Tensor | None = None

    @classmethod
    def of(cls, sched: Schedule, method: Method) -> Branch | None:
        return None if method.interval == 1 else cls(full_calls(sched.n, method.interval))

    def next_is_whole(self) -> bool:
        self.calls += 1
        return self.last_was_whole

    @property
    def last_was_whole(self) -> bool:
        return self.whole[self.calls - 1]


class ReferencePipeline:
    """FashionR2R's generation on a loaded SD-1.x model, batch of B images of one size."""

    def __init__(self, components: Components, embedding: str | Path, width: int, height: int) -> None:
        self.c = components
        self.width, self.height = width, height
        self.c_null, self.c_neg = encode_conditioning(components, embedding)
        dev, dt = self.device, self.dtype
        self.c_null, self.c_neg = self.c_null.to(dev, dt), self.c_neg.to(dev, dt)
        # prompts: the model's own text encoder (no placeholder rows), one conditioning per distinct prompt
        token = load_embedding(embedding)[0]
        self.prompts = ConditioningCache(components.tokenizer, token, self._encode_prompt)
        self._plan: TACPlan | None = None
        self._state: TACState | None = None
        self.count = EvalCount()
        # Called with (stage, latents, timestep, conditioning) before every UNet evaluation: how INT8 calibration
        # sees the method's own trajectories ("inversion", "generation_cg", "generation").
        self.observer: Callable[[str, torch.Tensor, int, torch.Tensor], None] | None = None

    @torch.no_grad()
    def _encode_prompt(self, ids: np.ndarray) -> torch.Tensor:
        te = self.c.text_encoder
        return te(torch.from_numpy(ids).to(te.device))[0].to(self.device, self.dtype)

    def text_rows(self, prompts: Sequence[str | None] | None, method: Method, batch: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The generation's text rows of a batch: (c_text [B, 77, d], w_t per row [B, 1, 1, 1]), an image without
        a prompt its null conditioning at weight 0; (None, None) where no image has a prompt or w_t is 0 (the
        paper's program exactly)."""
        if prompts is not None and len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        weights = text_weights(prompts, method.text_guidance)
        if prompts is None or weights is None:
            return None, None
        self.prompts.check(prompts)
        c_text = torch.cat([self.prompts(p) if p else self.c_null for p in prompts])
        w_text = torch.tensor(weights, dtype=self.dtype, device=self.device).view(-1, 1, 1, 1)
        return c_text, w_text

    @property
    def device(self) -> torch.device:
        return self.c.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.c.unet.dtype

    def tac(self, method: Method) -> tuple[TACPlan, TACState]:
        """The TAC plan for this resolution and divisor, installed on the UNet with the method's attention pool
        (made again on a change)."""
        if self._plan is None or self._plan.divisor != method.divisor or self._plan.pool != method.pool \
                or self._state is None or self._state.target != method.tac_target:
            self._plan = plan_tac(self.c.unet.config, self.width, self.height, method.divisor, method.pool)
            self._state = install_tac(self.c.unet, self._plan, method.tac_target)
        return self._plan, self._state

    def set_size(self, width: int, height: int) -> None:
        """Serve images of width x height from now on (the TAC plan is made again if it differs at that size)."""
        if (width, height) == (self.width, self.height):
            return
        self.width, self.height = width, height
        if self._plan is not None:
            new = plan_tac(self.c.unet.config, width, height, self._plan.divisor, self._plan.pool)
            if [lyr.name for lyr in new.layers] != [lyr.name for lyr in self._plan.layers]:
                self._plan = None

    def schedule(self, method: Method) -> Schedule:
        return make_schedule(self.c.scheduler, method)

    def _unet(self, stage: str, z: torch.Tensor, t: int, cond: torch.Tensor, branch: Branch | None = None
              ) -> torch.Tensor:
        """eps of one UNet call; with a step-cache `branch`, its whole call (which refreshes the branch's deep
        features) or its shallow one on them."""
        self.count.add(stage, z.shape[0])
        if self.observer is not None:
            self.observer(stage, z, t, cond)
        ts = torch.tensor(t, dtype=torch.long, device=z.device)
        if branch is None:
            return self.c.unet(z, ts, encoder_hidden_states=cond).sample
        eps, branch.deep = unet_split(self.c.unet, z, ts, cond, None if branch.next_is_whole() else branch.deep)
        return eps

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images of the pipeline's size -> z0 [B, C, h, w]."""
        for im in images:
            if im.shape != (self.height, self.width, 3):
                raise ValueError(f"image of shape {im.shape}, pipeline expects {(self.height, self.width, 3)}")
        x = torch.from_numpy(np.stack([to_model_input(im) for im in images])).to(self.device, self.dtype)
        return self.c.vae.encode(x).latent_dist.mean * self.c.scaling_factor

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, sched: Schedule, method: Method | None = None) -> list[torch.Tensor]:
        """DDIM inversion over ts ascending (step caching: the method's); returns z_t indexed like sched.timesteps
        (descending)."""
        b = z0.shape[0]
        cond = self.c_null.expand(b, -1, -1)
        z = z0
        latents: list[torch.Tensor] = [z0] * sched.n
        branch = Branch.of(sched, method) if method is not None else None
        for j in reversed(range(sched.n)):
            eps = self._unet("inversion", z, sched.timesteps[j], cond, branch)
            z = ddim_transfer(z, eps, sched.alpha_prev[j], sched.alpha[j])
            latents[j] = z
        return latents

    @torch.no_grad()
    def invert_single_pass(self, z0: torch.Tensor, sched: Schedule, method: Method
                           ) -> tuple[list[torch.Tensor], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Single-pass inversion: each step reuses the UNet evaluated at the previous latent and that latent's own
        timestep (z0 at ts[-1] - D, at least 0); the window's evaluations capture their TAC Q/K for generation.

        Returns the latents (like `invert`) and, per window step i, the Q/K captured at z_t(i)."""
        _, state = self.tac(method)
        b = z0.shape[0]
        cond = self.c_null.expand(b, -1, -1)
        window = tac_window(sched.n, method.tac_ratio)
        t0 = max(sched.timesteps[-1] - sched.stride, 0)
        eps = self._unet("inversion", z0, t0, cond)
        z = z0
        latents: list[torch.Tensor] = [z0] * sched.n
        kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(window)]
        for j in reversed(range(sched.n)):
            z = ddim_transfer(z, eps, sched.alpha_prev[j], sched.alpha[j])
            latents[j] = z
            if j < window:
                state.mode = TACMode.CAPTURE
                try:
                    eps = self._unet("inversion", z, sched.timesteps[j], cond)
                    kept[j] = state.take_captured()
                finally:
                    state.mode = TACMode.OFF
            elif j > 0:  # the last latent's evaluation would feed no step
                eps = self._unet("inversion", z, sched.timesteps[j], cond)
        return latents, kept

    @torch.no_grad()
    def generate(self, latents: list[torch.Tensor], sched: Schedule, method: Method,
                 kept: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 c_text: torch.Tensor | None = None, w_text: torch.Tensor | None = None) -> torch.Tensor:
        """Negative-embedding guidance from z_{ts[0]}, TAC on the null pass in the window: the Q/K of a cg pass on
        z_t(i), or those `kept` by a single-pass inversion. With step caching, the cg passes and the [neg, null]
        passes each keep a cache, and a shallow cg pass hands the Q/K of the TAC layers it computes. With text rows
        (`text_rows`), the guided batch is [neg, null, text], the text block under TAC where `method.text_tac`
        says, and the guidance has its second term."""
        plan, state = self.tac(method)
        b = latents[0].shape[0]
        conds = [self.c_neg.expand(b, -1, -1), self.c_null.expand(b, -1, -1)] + ([c_text] if c_text is not None
                                                                               else [])
        cond_pair = torch.cat(conds)
        controlled = (method.tac_target == "both", True) + ((method.text_tac,) if c_text is not None else ())
        cond_cg = self.c_null.expand(b, -1, -1)
        window = tac_window(sched.n, method.tac_ratio)
        cg, pair = Branch.of(sched, method), Branch.of(sched, method)
        shallow = shallow_layers(plan, self.c.unet.config) if cg is not None else frozenset()
        zr = latents[0]
        for i, t in enumerate(sched.timesteps):
            if i < window:
                if kept is None:
                    state.mode = TACMode.CAPTURE
                    self._unet("generation_cg", latents[i], t, cond_cg, cg)
                    whole = cg is None or cg.last_was_whole
                    state.injected = state.take_captured() if whole else state.take_partial(shallow)
                else:
                    state.injected = kept[i]
                state.mode, state.inject_rows = TACMode.INJECT, controlled
            try:
                eps = self._unet("generation", torch.cat([zr] * len(conds)), t, cond_pair, pair)
            finally:
                state.mode, state.injected, state.inject_rows = TACMode.OFF, (), None
            if c_text is None:
                e_neg, e_null = eps.chunk(2)
                e = guide(e_neg, e_null, method.guidance)
            else:
                e_neg, e_null, e_text = eps.chunk(3)
                e = guide(e_neg, e_null, method.guidance, e_text, w_text)
            zr = ddim_transfer(zr, e, sched.alpha[i], sched.alpha_prev[i])
        return zr

    @torch.no_grad()
    def decode(self, zr: torch.Tensor) -> list[np.ndarray]:
        x = self.c.vae.decode(zr / self.c.scaling_factor).sample
        u8 = (x.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return [im.permute(1, 2, 0).cpu().numpy() for im in u8]

    def __call__(self, images: list[np.ndarray], method: Method, inversion: Inversion = "exact",
                 prompts: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """Images of the pipeline's size -> outputs; `prompts`: one per image (None or "": none), used where
        `method.text_guidance` > 0."""
        if inversion == "single-pass" and method.interval > 1:
            raise ValueError(f"--cache-interval {method.cache_interval}: step caching runs with exact inversion")
        c_text, w_text = self.text_rows(prompts, method, len(images))
        sched = self.schedule(method)
        self.tac(method)
        self.count.images += len(images)
        z0 = self.encode(images)
        if inversion == "single-pass":
            latents, kept = self.invert_single_pass(z0, sched, method)
            return self.decode(self.generate(latents, sched, method, kept, c_text, w_text))
        return self.decode(self.generate(self.invert(z0, sched, method), sched, method, None, c_text, w_text))
