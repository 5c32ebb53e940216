"""Texture-preserving Attention Control: the plan (which layers, which steps) and the processor.

This is the one definition of TAC (paper eq. 9; docs/design.md, "TAC layers"). The PyTorch reference and the ONNX
export both install `TACProcessor` through diffusers' attention-processor API; a `TACState` owned by
the caller switches it between plain attention, capture (the emit graph), injection (the inject
graph), the fused three-way batch, and routing by a per-row source index (the `unet` graph: one
graph serves the plain batch, the guided pair and the fused step).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from r2r.graph_io import key_level

SUPPORTED_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
SUPPORTED_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
SUPPORTED_MID = {"UNetMidBlock2DCrossAttn": True, None: False}


@dataclass(frozen=True)
class TACLayer:
    """One self-attention layer under control: its module name, tokens N and channels C."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    level: int  # latent resolution level (0 = full latent)
    tokens: int
    channels: int

    @property
    def processor_key(self) -> str:
        return f"{self.name}.processor"


@dataclass(frozen=True)
class TACPlan:
    """The TAC layers of a UNet at one resolution, in UNet execution order, and the attention pool of the first
    level's self-attention (1: off; docs/design.md, "Less work per image")."""

    layers: tuple[TACLayer, ...]
    width: int
    height: int
    divisor: int
    pool: int = 1

    def __post_init__(self) -> None:
        if self.pool < 1 or self.pool & (self.pool - 1):
            raise ValueError(f"attention pool must be a power of two >= 1, got {self.pool}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def key_level(self, layer: TACLayer) -> int:
        return key_level(layer.level, self.pool)

    def as_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "divisor": self.divisor,
            "layers": [
                {"name": lyr.name, "level": lyr.level, "tokens": lyr.tokens, "channels": lyr.channels}
                for lyr in self.layers
            ],
            # only where pooled: the plans (and so the graph keys) of bundles without a pool stay what they were
            **({"pool": self.pool} if self.pool != 1 else {}),
        }


def tac_window(n: int, tac_ratio: float) -> int:
    """Number of leading generation steps under TAC: i < int(n * tac_ratio)."""
    return int(n * tac_ratio)


def _per_block(value: int | Sequence[int], count: int) -> list[int]:
    return [int(value)] * count if isinstance(value, int) else [int(v) for v in value]


def self_attention_layers(unet_config: Mapping[str, Any], width: int, height: int) -> list[TACLayer]:
    """Every attn1 layer of an SD-1.x-family UNet with its token count at (width, height) pixels.

    Derived from the config alone (no weights), in execution order: down blocks, mid, up blocks.
    """
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    mid_type = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    channels = list(unet_config["block_out_channels"])
    levels = len(channels)
    layers_per_block = _per_block(unet_config.get("layers_per_block", 2), levels)
    tlayers = _per_block(unet_config.get("transformer_layers_per_block", 1), levels)
    for t in down_types:
        if t not in SUPPORTED_DOWN:
            raise ValueError(f"down block {t!r} is not an SD-1.x block; supported: {sorted(SUPPORTED_DOWN)}")
    for t in up_types:
        if t not in SUPPORTED_UP:
            raise ValueError(f"up block {t!r} is not an SD-1.x block; supported: {sorted(SUPPORTED_UP)}")
    if mid_type not in SUPPORTED_MID:
        raise ValueError(f"mid block {mid_type!r} is not supported")

    # Latent size per level: VAE factor 8, then a stride-2 conv (padding 1) per level.
    h, w = height // 8, width // 8
    sizes = []
    for _ in range(levels):
        sizes.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)

    out: list[TACLayer] = []
    for i, t in enumerate(down_types):
        if SUPPORTED_DOWN[t]:
            for a in range(layers_per_block[i]):
                for k in range(tlayers[i]):
                    name = f"down_blocks.{i}.attentions.{a}.transformer_blocks.{k}.attn1"
                    out.append(TACLayer(name, i, sizes[i], channels[i]))
    if SUPPORTED_MID[mid_type]:
        for k in range(tlayers[-1]):
            out.append(TACLayer(f"mid_block.attentions.0.transformer_blocks.{k}.attn1",
                                levels - 1, sizes[-1], channels[-1]))
    rev_layers = list(reversed(layers_per_block))
    rev_t = _per_block(unet_config.get("reverse_transformer_layers_per_block") or list(reversed(tlayers)),
                       levels)
    for i, t in enumerate(up_types):
        level = levels - 1 - i
        if SUPPORTED_UP[t]:
            for a in range(rev_layers[i] + 1):
                for k in range(rev_t[i]):
                    name = f"up_blocks.{i}.attentions.{a}.transformer_blocks.{k}.attn1"
                    out.append(TACLayer(name, level, sizes[level], channels[level]))
    return out


def pixel_multiple(unet_config: Mapping[str, Any]) -> int:
    """The side multiple at which every UNet level has whole sides: 8 per latent cell, times 2 per downsampling.

    At such sizes a layer's token count is H*W / (64 * 4**level), so whether N * divisor >= H * W, and with it the TAC
    plan, depends on the level alone: one plan serves every size of a bundle's range."""
    return 8 * 2 ** (len(unet_config["block_out_channels"]) - 1)


def plan_tac(unet_config: Mapping[str, Any], width: int, height: int, divisor: int, pool: int = 1) -> TACPlan:
    """Paper eq. 9's f > F, as the public code's attn_replace_layers: N * divisor >= H * W; `pool`: the attention
    pool of the first level."""
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    chosen = tuple(
        layer for layer in self_attention_layers(unet_config, width, height)
        if layer.tokens * divisor >= width * height
    )
    return TACPlan(chosen, width, height, divisor, pool)


class TACMode(enum.Enum):
    OFF = "off"  # plain self-attention
    CAPTURE = "capture"  # record Q, K of the whole batch (the cg pass; the emit graph)
    INJECT = "inject"  # batch [neg x B, null x B]: null half's Q, K := given tensors
    FUSED = "fused"  # batch [cg x B, neg x B, null x B]: null third's Q, K := cg third's
    ROUTED = "routed"  # row r takes the Q, K of row src[r] (identity: plain; [cg, neg, cg]: fused)


@dataclass
class TACState:
    """Switch shared by one UNet's TAC processors; owned by a pipeline or an export wrapper."""

    num_layers: int
    mode: TACMode = TACMode.OFF
    target: str = "null"  # "both": the negative pass is controlled too
    captured: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    injected: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = ()
    src: torch.Tensor | None = None  # ROUTED: int64 [N], the row whose Q, K each row uses
    # INJECT: which B-row blocks of the batch take the injected Q/K ([neg, null, text] with a prompt; None: the
    # [neg, null] pair, the null block and, with target "both", the negative one)
    inject_rows: tuple[bool, ...] | None = None
    # Attention downsampling (docs/design.md, "Less work per image"): the first level's self-attention takes its keys
    # and values from the token grid average-pooled `pool` x `pool` (the plan's); 1: off. `grid`: the first level's
    # token grid (the latent's height and width), set by a forward pre-hook on the UNet's conv_in before every call
    # (a whole call and a step-cache split alike run it).
    pool: int = 1
    grid: tuple[Any, Any] | None = None
    hook: Any = None  # the conv_in pre-hook's handle, removed when another state replaces this one

    def __post_init__(self) -> None:
        self.captured = [None] * self.num_layers

    def take_captured(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i, qk in enumerate(self.captured):
            if qk is None:
                raise RuntimeError(f"TAC layer {i} captured nothing: does the plan match the UNet?")
            out.append(qk)
        self.captured = [None] * self.num_layers
        return out

    @contextlib.contextmanager
    def routed(self, src: torch.Tensor) -> Iterator[None]:
        """Route by `src` for the calls inside (the routed graphs, whole or step-cache split), then plain again."""
        self.mode, self.src = TACMode.ROUTED, src
        try:
            yield
        finally:
            self.mode, self.src = TACMode.OFF, None

    def take_partial(self, layers: frozenset[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """What a step-cache shallow call captured: the Q/K of `layers` (the ones it computes), None elsewhere."""
        missing = [i for i in layers if self.captured[i] is None]
        if missing:
            raise RuntimeError(f"TAC layers {missing} captured nothing in a shallow call")
        out = [qk if i in layers else None for i, qk in enumerate(self.captured)]
        self.captured = [None] * self.num_layers
        return out


class TACProcessor:
    """Self-attention of one TAC layer, with the Q/K routing of the state's mode (`index` None: a first-level layer
    outside the plan, pooled but never routed), and the keys and values of the state's attention pool.

    Plain mode with no pool performs the same operations as diffusers' default SDPA processor, so TAC with an
    empty window is bit-identical to the unmodified model.
    """

    def __init__(self, index: int | None, layer: TACLayer, state: TACState) -> None:
        self.index = index
        self.layer = layer
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer.name}: TAC applies to self-attention (attn1) only")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.layer.name}: unsupported attention layout for TAC")
        batch = hidden_states.shape[0]
        residual = hidden_states
        query = attn.to_q(hidden_states)
        kv_states = self._pooled(hidden_states)
        key = attn.to_k(kv_states)
        value = attn.to_v(kv_states)
        if self.index is not None:
            query, key = self._route(query, key)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _pooled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The tokens keys and values are made from: the first level's grid average-pooled pool x pool (the
        projections are affine, so pooling before them equals pooling their outputs, at a pool**2 of the cost)."""
        pool = self.state.pool
        if pool == 1 or self.layer.level != 0:
            return hidden_states
        if self.state.grid is None:
            raise RuntimeError(f"{self.layer.name}: attention pool without the latent grid (install_tac's hook)")
        h, w = self.state.grid
        b, _, c = hidden_states.shape
        # the tokens are the grid row by row
        cells = hidden_states.reshape(b, h // pool, pool, w // pool, pool, c)
        return cells.mean(dim=(2, 4)).reshape(b, -1, c)

    def _route(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state
        mode = st.mode
        if mode is TACMode.OFF:
            return q, k
        if mode is TACMode.CAPTURE:
            st.captured[self.index] = (q, k)
            return q, k
        if mode is TACMode.ROUTED:
            if st.src is None:
                raise RuntimeError(f"{self.layer.name}: routed TAC without a source index")
            return q.index_select(0, st.src), k.index_select(0, st.src)
        both = st.target == "both"
        if mode is TACMode.INJECT:
            given = st.injected[self.index]
            if given is None:
                raise RuntimeError(f"{self.layer.name}: no Q/K to inject (a shallow call's capture lacks this layer)")
            qi, ki = given
            b = qi.shape[0]
            rows = st.inject_rows or (both, True)
            # blocks by slices, not split(b): the export keeps the batch symbolic (a split's count would fix it)
            return (torch.cat([qi if r else q[j * b : (j + 1) * b] for j, r in enumerate(rows)]),
                    torch.cat([ki if r else k[j * b : (j + 1) * b] for j, r in enumerate(rows)]))
        # FUSED: thirds [cg, neg, null]
        b = q.shape[0] // 3
        qc, kc = q[:b], k[:b]
        if both:
            return torch.cat([qc, qc, qc]), torch.cat([kc, kc, kc])
        return torch.cat([q[: 2 * b], qc]), torch.cat([k[: 2 * b], kc])


def install_tac(unet: torch.nn.Module, plan: TACPlan, target: str = "null") -> TACState:
    """Put a TACProcessor on every planned layer (others keep theirs; with the plan's pool > 1, on every first-level
    self-attention too) and return their state."""
    processors = dict(unet.attn_processors)  # type: ignore[attr-defined]
    missing = [lyr.processor_key for lyr in plan.layers if lyr.processor_key not in processors]
    if missing:
        raise ValueError(f"TAC plan names layers the UNet lacks: {missing[:3]}")
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = TACState(num_layers=len(plan.layers), target=target, pool=plan.pool)
    for key, proc in processors.items():  # a previous plan's layers return to plain attention
        if isinstance(proc, TACProcessor):
            if proc.state.hook is not None:
                proc.state.hook.remove()
                proc.state.hook = None
            processors[key] = AttnProcessor2_0()
    for i, layer in enumerate(plan.layers):
        processors[layer.processor_key] = TACProcessor(i, layer, state)
    if plan.pool > 1:
        planned = set(plan.names)
        for layer in self_attention_layers(unet.config, plan.width, plan.height):  # type: ignore[attr-defined]
            if layer.level == 0 and layer.name not in planned:
                processors[layer.processor_key] = TACProcessor(None, layer, state)

        def record_grid(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            state.grid = (args[0].shape[-2], args[0].shape[-1])

        state.hook = unet.conv_in.register_forward_pre_hook(record_grid)  # type: ignore[union-attr]
    unet.set_attn_processor(processors)  # type: ignore[attr-defined]
    return state
