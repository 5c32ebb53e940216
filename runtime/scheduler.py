"""The coupled two-branch scheduler: inversion and TAC-guided generation as one bound program.

For a batch size B and a schedule, every buffer is allocated once and every graph call is bound
once; running a batch is: upload the images, execute the program, download the images. The emit
graph's Q/K outputs are the inject graph's Q/K inputs (the same buffers), the inversion latents are
read in place by the cg passes, and the [zr, zr] batch is written by the update itself.

Graph calls per image at the defaults (n = 15, window 13): exact inversion 15 + 13 + 30 = 58;
single-pass inversion 16 + 30 = 46 (DESIGN.md, "UNet evaluations per image").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from r2r import graph_io as io
from r2r.config import MethodConfig
from r2r.imageio import from_model_output, to_model_input
from r2r.runtime.bundle import Bundle
from r2r.runtime.device import Backend, Coefficients, DeviceArray, Op
from r2r.schedule import Schedule, transfer_coefficients

Inversion = Literal["exact", "single-pass"]


@dataclass
class Plan:
    """A bound program and what it evaluates, for one (batch, method, inversion, fused)."""

    ops: list[Op]
    unet_evaluations: Counter = field(default_factory=Counter)  # graph -> latents evaluated per image
    graph_calls: Counter = field(default_factory=Counter)
    stages: dict[str, slice] = field(default_factory=dict)  # encode / inversion / generation / decode
    unet_ops: dict[int, int] = field(default_factory=dict)  # op index -> latents per image it evaluates


class CoupledScheduler:
    """FashionR2R's generation on a bundle through one backend, batch of B images."""

    def __init__(self, bundle: Bundle, backend: Backend, batch: int, method: MethodConfig,
                 inversion: Inversion = "exact", fused: bool = False) -> None:
        bundle.check(method, batch)
        if fused and io.UNET_FUSED not in bundle.manifest.graphs:
            raise ValueError(f"{bundle.root}: no {io.UNET_FUSED} graph in the bundle")
        if fused and inversion != "exact":
            raise ValueError("the fused graph pairs with exact inversion only")
        self.bundle, self.backend, self.batch, self.method = bundle, backend, batch, method
        self.inversion, self.fused = inversion, fused
        self.schedule, self.window = bundle.schedule(method)
        self._alloc()
        self.plan = self._build()

    # -- buffers ---------------------------------------------------------------------------------
    def _alloc(self) -> None:
        be, b, n = self.backend, self.batch, self.schedule.n
        c, h, w = self.bundle.latent_shape
        lat = (c, h, w)
        self.image_in = be.empty((b, 3, self.bundle.height, self.bundle.width))
        self.image_out = be.empty((b, 3, self.bundle.height, self.bundle.width))
        self.z0 = be.empty((b, *lat))
        d = self.bundle.c_null.shape[-1]
        self.c_null = be.empty((b, 77, d))
        self.c_pair = be.empty((2 * b, 77, d))
        be.upload(self.c_null, np.repeat(self.bundle.c_null, b, axis=0))
        be.upload(self.c_pair, np.concatenate([np.repeat(self.bundle.c_neg, b, 0),
                                               np.repeat(self.bundle.c_null, b, 0)]))
        if self.fused:
            self.c_fused = be.empty((3 * b, 77, d))
            be.upload(self.c_fused, np.concatenate([np.repeat(self.bundle.c_null, b, 0),
                                                    np.repeat(self.bundle.c_neg, b, 0),
                                                    np.repeat(self.bundle.c_null, b, 0)]))
            # Step i's fused batch is [z_t(i), zr, zr]: the inversion and the update write into it.
            self.fused_in = be.empty((n, 3 * b, *lat))
            self.zs = [self.fused_in[i][:b] for i in range(n)]
        else:
            zs = be.empty((n, b, *lat))
            self.zs = [zs[i] for i in range(n)]
        self.pairs = be.empty((2, 2 * b, *lat))  # ping-pong [zr, zr] batches
        self.eps1 = be.empty((b, *lat))
        self.eps_pair = be.empty((2 * b, *lat))
        self.eps_fused = be.empty((3 * b, *lat)) if self.fused else None
        self.z_scratch = be.empty((b, *lat))
        layers = self.bundle.tac_layers
        slots = self.window if self.inversion == "single-pass" else min(self.window, 1)
        self.qk = [[be.empty((b, lyr["tokens"], lyr["channels"])) for lyr in layers for _ in (0, 1)]
                   for _ in range(slots)]
        sched = self.schedule
        self.timesteps = be.empty((n + 1, 1))
        be.upload(self.timesteps, np.array([[t] for t in (*sched.timesteps, self._t0())], np.float32))
        self.coef_host = self._coefficients()
        self.coefs = be.empty((len(self.coef_host), 3))
        be.upload(self.coefs, np.array([[c.cz, c.ce, c.w] for c in self.coef_host], np.float32))

    def _t0(self) -> int:
        """Single-pass inversion evaluates z0 at its own level: timestep ts[-1] - D, at least 0."""
        return max(self.schedule.timesteps[-1] - self.schedule.stride, 0)

    def _coefficients(self) -> list[Coefficients]:
        s: Schedule = self.schedule
        inv = [Coefficients(*transfer_coefficients(s.alpha_prev[j], s.alpha[j])) for j in range(s.n)]
        gen = [Coefficients(*transfer_coefficients(s.alpha[i], s.alpha_prev[i]), self.method.guidance)
               for i in range(s.n)]
        return inv + gen

    # -- program ---------------------------------------------------------------------------------
    def _unet_call(self, plan: Plan, graph: str, sample: DeviceArray, t: int, cond: DeviceArray,
                   eps: DeviceArray, qk: list[DeviceArray] | None = None, qk_in: bool = False) -> Op:
        binds = {io.SAMPLE: sample, io.TIMESTEP: self.timesteps[t], io.ENCODER_HIDDEN_STATES: cond, io.EPS: eps}
        if qk is not None:
            binds |= dict(zip(io.tac_names(len(self.bundle.tac_layers)), qk, strict=True))
        plan.unet_evaluations[graph] += sample.shape[0] // self.batch
        plan.graph_calls[graph] += 1
        plan.unet_ops[len(plan.ops)] = sample.shape[0] // self.batch
        return self.backend.call(graph, binds)

    def _build(self) -> Plan:
        be, b, n = self.backend, self.batch, self.schedule.n
        plan = Plan([])
        ops = plan.ops
        ops.append(be.call(io.VAE_ENCODER, {io.IMAGE: self.image_in, io.LATENT: self.z0}))
        plan.stages["encode"] = slice(0, len(ops))
        single = self.inversion == "single-pass"

        # Inversion over ts ascending (j = n-1 .. 0), z_t of step j into zs[j].
        if single:
            # e = UNet(z, t) at each latent's own timestep; the window's Q/K are kept per step.
            ops.append(self._unet_call(plan, io.UNET, self.z0, n, self.c_null, self.eps1))
        src = self.z0
        for j in reversed(range(n)):
            if not single:
                ops.append(self._unet_call(plan, io.UNET, src, j, self.c_null, self.eps1))
            ops.append(be.ddim(self.zs[j], src, self.eps1, self.coef_host[j], self.coefs[j]))
            if single:
                if j < self.window:
                    ops.append(self._unet_call(plan, io.UNET_EMIT, self.zs[j], j, self.c_null, self.eps1,
                                               self.qk[j]))
                elif j > 0:
                    ops.append(self._unet_call(plan, io.UNET, self.zs[j], j, self.c_null, self.eps1))
            src = self.zs[j]

        plan.stages["inversion"] = slice(plan.stages["encode"].stop, len(ops))

        # Generation from zr = z_{ts[0]}.
        def pair(i: int) -> DeviceArray:
            if self.fused and i < self.window:
                return self.fused_in[i][b:]
            return self.pairs[i % 2]

        first = pair(0)
        ops.append(be.copy(first[:b], self.zs[0]))
        ops.append(be.copy(first[b:], self.zs[0]))
        for i in range(n):
            cur, nxt = pair(i), (pair(i + 1) if i + 1 < n else self.pairs[(i + 1) % 2])
            eps = self.eps_pair
            if i < self.window and self.fused:
                ops.append(self._unet_call(plan, io.UNET_FUSED, self.fused_in[i], i, self.c_fused,
                                           self.eps_fused))
                eps = self.eps_fused[b:]
            elif i < self.window:
                qk = self.qk[i] if single else self.qk[0]
                if not single:
                    ops.append(self._unet_call(plan, io.UNET_EMIT, self.zs[i], i, self.c_null, self.eps1, qk))
                ops.append(self._unet_call(plan, io.UNET_INJECT, cur, i, self.c_pair, eps, qk, qk_in=True))
            else:
                ops.append(self._unet_call(plan, io.UNET, cur, i, self.c_pair, eps))
            ops.append(be.guided(nxt, cur[:b], eps, self.coef_host[n + i], self.coefs[n + i]))
        self.final = nxt[:b]
        plan.stages["generation"] = slice(plan.stages["inversion"].stop, len(ops))
        ops.append(be.call(io.VAE_DECODER, {io.LATENT: self.final, io.IMAGE: self.image_out}))
        plan.stages["decode"] = slice(plan.stages["generation"].stop, len(ops))
        return plan

    @property
    def unet_evaluations_per_image(self) -> int:
        return sum(self.plan.unet_evaluations.values())

    # -- running ---------------------------------------------------------------------------------
    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, 3] images (at most B; fewer are padded) -> uint8 outputs."""
        k = len(images)
        if not 1 <= k <= self.batch:
            raise ValueError(f"{k} images for a batch of {self.batch}")
        x = np.stack([to_model_input(im) for im in images] + [to_model_input(images[-1])] * (self.batch - k))
        self.backend.upload(self.image_in, x)
        self.backend.execute(self.plan.ops, key=id(self))
        out = self.backend.download(self.image_out)
        return [from_model_output(out[i]) for i in range(k)]
