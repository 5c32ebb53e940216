"""Graph and tensor names: the contract between export, engines and runtime (DESIGN.md, "Graphs")."""

from __future__ import annotations

# Graphs of a bundle.
UNET = "unet"
UNET_EMIT = "unet_emit"
UNET_INJECT = "unet_inject"
UNET_FUSED = "unet_fused"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
# The scheduler's arithmetic as graphs, so that it runs on the device next to the UNet (TensorRT).
DDIM_STEP = "ddim_step"  # z_next = cz * z + ce * eps
GUIDED_STEP = "guided_step"  # e = e_neg + w (e_null - e_neg); z_pair = [z_next, z_next]
UNET_GRAPHS = (UNET, UNET_EMIT, UNET_INJECT, UNET_FUSED)
STEP_GRAPHS = (DDIM_STEP, GUIDED_STEP)
ALL_GRAPHS = (*UNET_GRAPHS, VAE_ENCODER, VAE_DECODER, *STEP_GRAPHS)

# UNet inputs and output.
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
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
