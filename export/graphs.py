"""The torch modules behind each exported graph (docs/design.md, "Graphs").

Every UNet variant runs the same UNet with the same TACProcessor installed: the wrapper only
switches the processors' mode, so the exported TAC is the reference's TAC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2r import graph_io
from r2r.step_cache import unet_split
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
        with self.state.routed(tac_src):
            return self._eps(sample, timestep, ehs)


class UNetDeep(_UNetGraph):
    """`unet_deep`: the routed `unet`'s eps and the features entering the last up block (step caching's whole call,
    r2r.step_cache.unet_split)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
                tac_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.state.routed(tac_src):
            return unet_split(self.unet, sample, timestep, ehs)


class UNetShallow(_UNetGraph):
    """`unet_shallow`: the routed first level on cached deep features (step caching's shallow call)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor, tac_src: torch.Tensor,
                deep: torch.Tensor) -> torch.Tensor:
        with self.state.routed(tac_src):
            return unet_split(self.unet, sample, timestep, ehs, deep)[0]


class UNetEmit(_UNetGraph):
    """`unet_emit`: eps and every TAC layer's Q, K (the cg pass), each as [B, h_l, w_l, C]: the layer's tokens on
    its level's grid (a pooled key: on the pooled grid), so that their shape is linear in the image's sides."""

    def __init__(self, unet: torch.nn.Module, state: TACState, plan: TACPlan) -> None:
        super().__init__(unet, state)
        self.levels = [(layer.level, plan.key_level(layer)) for layer in plan.layers]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.state.mode = TACMode.CAPTURE
        try:
            eps = self._eps(sample, timestep, ehs)
            qk = self.state.take_captured()
        finally:
            self.state.mode = TACMode.OFF
        h, w = sample.shape[2], sample.shape[3]
        out = [eps]
        for (q, k), (q_level, k_level) in zip(qk, self.levels, strict=True):
            out += [t.reshape(t.shape[0], h >> lvl, w >> lvl, t.shape[-1]) for t, lvl in ((q, q_level), (k, k_level))]
        return tuple(out)


class UNetInject(_UNetGraph):
    """`unet_inject`: batch [neg x B, null x B]; the null half's Q, K come from the inputs ([B, h_l, w_l, C])."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor,
                *qk: torch.Tensor) -> torch.Tensor:
        flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in qk]
        self.state.mode = TACMode.INJECT
        self.state.injected = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
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


class TextEncoder(torch.nn.Module):
    """`text_encoder`: token ids -> the text encoder's last hidden state (the conditioning a prompt gives)."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


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


class GuidedTextStep(torch.nn.Module):
    """`guided_text_step`: the two-term guidance (docs/design.md, "Prompts") with each image's own w_t, then the
    generation update, written to the three blocks of the next [neg, null, text] batch."""

    def forward(self, z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, w_text: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        e_neg, e_null, e_text = eps[:b], eps[b : 2 * b], eps[2 * b :]
        e = e_neg + coef[2] * (e_null - e_neg)
        e = e + w_text.reshape(-1, 1, 1, 1) * (e_text - e_null)
        z_next = coef[0] * z + coef[1] * e
        return torch.cat([z_next, z_next, z_next])


@dataclass(frozen=True)
class GraphSpec:
    """Names, batch multiplicity and spatial role of one graph's inputs and outputs, from the contract.

    A role says which dimensions follow the image's size: "latent" ([., ., L*hm, L*wm], L = multiple / 8),
    "image" ([., ., m*hm, m*wm]), "qk<level>" ([., (L >> level)*hm, (L >> level)*wm, .]); "" none.
    """

    name: str
    inputs: tuple[tuple[str, str, str], ...]  # (tensor name, batch symbol, spatial role)
    outputs: tuple[tuple[str, str, str], ...]


def spatial_dims(role: str, multiple: int) -> dict[int, tuple[int, str]]:
    """axis -> (factor, symbol) of a role's spatial dimensions, for a bundle of pixel multiple `multiple`."""
    latent = multiple // 8
    if role == "latent":
        return {2: (latent, graph_io.HM), 3: (latent, graph_io.WM)}
    if role == "image":
        return {2: (multiple, graph_io.HM), 3: (multiple, graph_io.WM)}
    if role.startswith("qk"):
        k = latent >> int(role[2:])
        return {1: (k, graph_io.HM), 2: (k, graph_io.WM)}
    return {}


def dim_expr(factor: int, symbol: str) -> str:
    return symbol if factor == 1 else f"{factor}*{symbol}"


def unet_specs(plan: TACPlan) -> dict[str, GraphSpec]:
    qk = tuple((name, "B", f"qk{level}") for i, layer in enumerate(plan.layers)
               for name, level in ((graph_io.tac_q(i), layer.level), (graph_io.tac_k(i), plan.key_level(layer))))
    base = ((graph_io.SAMPLE, "B", "latent"), (graph_io.TIMESTEP, "", ""), (graph_io.ENCODER_HIDDEN_STATES, "B", ""))

    def times(k: str) -> tuple[tuple[str, str, str], ...]:
        return tuple((n, k if b else "", role) for n, b, role in base)

    routed = (*base, (graph_io.TAC_SRC, "B", ""))
    eps = (graph_io.EPS, "B", "latent")
    deep = (graph_io.DEEP, "B", "latent")
    return {
        graph_io.UNET: GraphSpec(graph_io.UNET, routed, (eps,)),
        graph_io.UNET_EMIT: GraphSpec(graph_io.UNET_EMIT, base, (eps, *qk)),
        graph_io.UNET_INJECT: GraphSpec(graph_io.UNET_INJECT, (*times("2*B"), *qk), ((graph_io.EPS, "2*B", "latent"),)),
        graph_io.UNET_DEEP: GraphSpec(graph_io.UNET_DEEP, routed, (eps, deep)),
        graph_io.UNET_SHALLOW: GraphSpec(graph_io.UNET_SHALLOW, (*routed, deep), (eps,)),
    }


STEP_SPECS = {
    graph_io.DDIM_STEP: GraphSpec(
        graph_io.DDIM_STEP,
        ((graph_io.Z, "B", "latent"), (graph_io.EPS, "B", "latent"), (graph_io.COEF, "", "")),
        ((graph_io.Z_NEXT, "B", "latent"),)),
    graph_io.GUIDED_STEP: GraphSpec(
        graph_io.GUIDED_STEP,
        ((graph_io.Z, "B", "latent"), (graph_io.EPS, "2*B", "latent"), (graph_io.COEF, "", "")),
        ((graph_io.Z_PAIR, "2*B", "latent"),)),
    graph_io.GUIDED_TEXT_STEP: GraphSpec(
        graph_io.GUIDED_TEXT_STEP,
        ((graph_io.Z, "B", "latent"), (graph_io.EPS, "3*B", "latent"), (graph_io.COEF, "", ""),
         (graph_io.W_TEXT, "B", "")),
        ((graph_io.Z_GROUP, "3*B", "latent"),)),
}

TEXT_ENCODER_SPEC = GraphSpec(graph_io.TEXT_ENCODER, ((graph_io.INPUT_IDS, "B", ""),),
                              ((graph_io.TEXT_EMBEDDINGS, "B", ""),))

VAE_SPECS = {
    graph_io.VAE_ENCODER: GraphSpec(graph_io.VAE_ENCODER, ((graph_io.IMAGE, "B", "image"),), ((graph_io.LATENT, "B",
                                                                                               "latent"),)),
    graph_io.VAE_DECODER: GraphSpec(graph_io.VAE_DECODER, ((graph_io.LATENT, "B", "latent"),), ((graph_io.IMAGE, "B",
                                                                                                 "image"),)),
}
