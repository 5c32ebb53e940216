"""The torch modules behind each exported graph (docs/design.md, "Graphs").

Every UNet variant runs the same UNet with the same TACProcessor installed: the wrapper only
switches the processors' mode, so the exported TAC is the reference's TAC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2r import graph_io as io
from r2r.tac import TACMode, TACPlan, TACState


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, state: TACState) -> None:
        super().__init__()
        self.unet = unet
        self.state = state

    def _eps(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=ehs, return_dict=False)[0]


class UNetRouted(_UNetGraph):
    """`unet`: eps of the batch, row r of every TAC layer using the Q, K of row tac_src[r]. The identity is the
    plain UNet; [cg x B, neg x B, null x B] with the null third pointing at the cg third is the fused TAC step."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
                tac_src: torch.Tensor) -> torch.Tensor:
        self.state.mode, self.state.src = TACMode.ROUTED, tac_src
        try:
            return self._eps(sample, timestep, ehs)
        finally:
            self.state.mode, self.state.src = TACMode.OFF, None


class UNetEmit(_UNetGraph):
    """`unet_emit`: eps and every TAC layer's Q, K (the cg pass)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.state.mode = TACMode.CAPTURE
        try:
            eps = self._eps(sample, timestep, ehs)
            qk = self.state.take_captured()
        finally:
            self.state.mode = TACMode.OFF
        return (eps, *[t for pair in qk for t in pair])


class UNetInject(_UNetGraph):
    """`unet_inject`: batch [neg x B, null x B]; the null half's Q, K come from the inputs."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
                *qk: torch.Tensor) -> torch.Tensor:
        self.state.mode = TACMode.INJECT
        self.state.injected = [(qk[2 * i], qk[2 * i + 1]) for i in range(len(qk) // 2)]
        try:
            return self._eps(sample, timestep, ehs)
        finally:
            self.state.mode, self.state.injected = TACMode.OFF, ()


class VaeEncoder(torch.nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> latent mean times the scaling factor."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.scale


class VaeDecoder(torch.nn.Module):
    """scaled latent -> image in [0, 1] (the clamp is in the graph; rounding to uint8 is not)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latent / self.scale).sample
        return (x / 2 + 0.5).clamp(0, 1)


class DdimStep(torch.nn.Module):
    """`ddim_step`: the inversion update of r2r.schedule.transfer_coefficients, on the device."""

    def forward(self, z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return coef[0] * z + coef[1] * eps


class GuidedStep(torch.nn.Module):
    """`guided_step`: paper eq. 8 then the generation update, written to both halves of the next batch."""

    def forward(self, z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]  # slices by z's batch keep eps's batch symbolic (2*B); chunk(2) would fix it
        e_neg, e_null = eps[:b], eps[b:]
        e = e_neg + coef[2] * (e_null - e_neg)
        z_next = coef[0] * z + coef[1] * e
        return torch.cat([z_next, z_next])


@dataclass(frozen=True)
class GraphSpec:
    """Names and batch multiplicity of one graph's inputs and outputs, from the contract."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (tensor name, batch symbol)
    outputs: tuple[tuple[str, str], ...]


def unet_specs(plan: TACPlan) -> dict[str, GraphSpec]:
    qk = tuple(io.tac_names(len(plan.layers)))
    base = ((io.SAMPLE, "B"), (io.TIMESTEP, ""), (io.ENCODER_HIDDEN_STATES, "B"))

    def times(k: str) -> tuple[tuple[str, str], ...]:
        return tuple((n, k if b else "") for n, b in base)

    return {
        io.UNET: GraphSpec(io.UNET, (*base, (io.TAC_SRC, "B")), ((io.EPS, "B"),)),
        io.UNET_EMIT: GraphSpec(io.UNET_EMIT, base, ((io.EPS, "B"), *((n, "B") for n in qk))),
        io.UNET_INJECT: GraphSpec(io.UNET_INJECT, (*times("2*B"), *((n, "B") for n in qk)), ((io.EPS, "2*B"),)),
    }


STEP_SPECS = {
    io.DDIM_STEP: GraphSpec(io.DDIM_STEP, ((io.Z, "B"), (io.EPS, "B"), (io.COEF, "")), ((io.Z_NEXT, "B"),)),
    io.GUIDED_STEP: GraphSpec(io.GUIDED_STEP, ((io.Z, "B"), (io.EPS, "2*B"), (io.COEF, "")), ((io.Z_PAIR, "2*B"),)),
}

VAE_SPECS = {
    io.VAE_ENCODER: GraphSpec(io.VAE_ENCODER, ((io.IMAGE, "B"),), ((io.LATENT, "B"),)),
    io.VAE_DECODER: GraphSpec(io.VAE_DECODER, ((io.LATENT, "B"),), ((io.IMAGE, "B"),)),
}
