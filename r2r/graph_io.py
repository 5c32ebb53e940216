"""Graph and tensor names, and the batch symbols of their shapes: the contract between export, engines and runtime
(docs/design.md, "Graphs")."""

from __future__ import annotations

from collections.abc import Sequence

# Graphs of a bundle. `unet` routes TAC by `tac_src`: one graph (one copy of the weights) serves the plain batch,
# the guided [neg, null] pair and the fused TAC step [cg, neg, null]; emit / inject carry Q/K as outputs / inputs.
UNET = "unet"
UNET_EMIT = "unet_emit"
UNET_INJECT = "unet_inject"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
# The scheduler's arithmetic as graphs, so that it runs on the device next to the UNet (TensorRT).
DDIM_STEP = "ddim_step"  # z_next = cz * z + ce * eps
GUIDED_STEP = "guided_step"  # e = e_neg + w (e_null - e_neg); z_pair = [z_next, z_next]
UNET_GRAPHS = (UNET, UNET_EMIT, UNET_INJECT)
STEP_GRAPHS = (DDIM_STEP, GUIDED_STEP)
ALL_GRAPHS = (*UNET_GRAPHS, VAE_ENCODER, VAE_DECODER, *STEP_GRAPHS)

# UNet inputs and output.
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TAC_SRC = "tac_src"  # int64 [N]: row r of every TAC layer takes the Q, K of row tac_src[r] (unet only)
EPS = "eps"

# VAE graphs.
IMAGE = "image"  # [B, 3, H, W] in [-1, 1] (encoder input); [B, 3, H, W] in [0, 1] (decoder output)
LATENT = "latent"  # [B, C, h, w] (C = 4 in SD 1.x), scaled by the VAE's scaling factor

# Step graphs.
Z = "z"  # [B, C, h, w]
COEF = "coef"  # [3] float32: cz, ce, w (w unused by ddim_step)
Z_NEXT = "z_next"  # ddim_step output [B, C, h, w]
Z_PAIR = "z_pair"  # guided_step output [2B, C, h, w]: the next [zr, zr] batch

# Conditioning files in the bundle's cond/ folder.
COND_NULL = "c_null"
COND_NEG = "c_neg"


def tac_q(i: int) -> str:
    """Query projection of TAC layer i (UNet order), [B, N_i, C_i]."""
    return f"tac_q_{i}"


def tac_k(i: int) -> str:
    """Key projection of TAC layer i (UNet order), [B, N_i, C_i]."""
    return f"tac_k_{i}"


def tac_names(num_layers: int) -> list[str]:
    """tac_q_0, tac_k_0, tac_q_1, ... : the order of Q/K in the emit outputs and inject inputs."""
    return [name for i in range(num_layers) for name in (tac_q(i), tac_k(i))]


# Batch dimensions are symbolic in the manifest: "B" (the call's batch) or "k*B".
BATCH = "B"


def batch_multiple(dim: int | str) -> int | None:
    """k for a batch dimension "B" / "k*B"; None for a fixed size. Anything else is refused."""
    if isinstance(dim, int):
        return None
    text = dim.replace(" ", "")
    if text == BATCH:
        return 1
    head, sep, tail = text.partition("*")
    if sep and tail == BATCH and head.isdigit() and int(head) > 0:
        return int(head)
    raise ValueError(f"dimension {dim!r}: a shape dimension is a fixed size, 'B' or 'k*B'")


def concrete_shape(shape: Sequence[int | str], batch: int) -> tuple[int, ...]:
    """A manifest shape with B bound to `batch`."""
    return tuple(int(d) if (k := batch_multiple(d)) is None else k * batch for d in shape)


# The values the coupled program binds to each graph's B, as multiples of the image batch: the routed UNet serves
# the inversion (B latents), the guided [neg, null] pair after the TAC window (2B) and the fused TAC step
# [cg, neg, null] (3B); every other graph is called at its own symbols with B = the image batch. TensorRT profiles
# take their shapes from this; the scheduler's tests check that its program binds nothing else.
CALL_MULTIPLES: dict[str, tuple[int, ...]] = {UNET: (1, 2, 3), **{g: (1,) for g in ALL_GRAPHS if g != UNET}}
