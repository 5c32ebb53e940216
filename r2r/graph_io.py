"""Graph and tensor names, and the batch symbols of their shapes: the contract between export, engines and runtime
(docs/design.md, "Graphs")."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping, Sequence

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
# with a prompt's text rows (docs/design.md, "Prompts"): e = e_neg + w (e_null - e_neg) + w_t (e_text - e_null), w_t
# per image; z_group = [z_next, z_next, z_next]
GUIDED_TEXT_STEP = "guided_text_step"
# Step caching (docs/design.md, "Less work per image"): the routed UNet that also returns the features entering its
# last up block, and the routed shallow path that takes them. Exported on request (`r2r-export onnx --step-cache`).
UNET_DEEP = "unet_deep"
UNET_SHALLOW = "unet_shallow"
UNET_GRAPHS = (UNET, UNET_EMIT, UNET_INJECT)
STEP_GRAPHS = (DDIM_STEP, GUIDED_STEP, GUIDED_TEXT_STEP)
STEP_CACHE_GRAPHS = (UNET_DEEP, UNET_SHALLOW)
# The graphs an export writes unless told otherwise; the step-cache pair is an addition a bundle may carry.
DEFAULT_GRAPHS = (*UNET_GRAPHS, VAE_ENCODER, VAE_DECODER, *STEP_GRAPHS)
ALL_GRAPHS = (*DEFAULT_GRAPHS, *STEP_CACHE_GRAPHS)
ROUTED_GRAPHS = (UNET, *STEP_CACHE_GRAPHS)  # the UNet graphs that take tac_src
# The model part whose weights each weight-carrying graph holds (its initializers are "<part>.<parameter>" or copies
# of them); the step graphs hold none.
WEIGHTS_OF = {**{g: "unet" for g in (*UNET_GRAPHS, *STEP_CACHE_GRAPHS)}, VAE_ENCODER: "vae", VAE_DECODER: "vae"}

# UNet inputs and output.
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TAC_SRC = "tac_src"  # int64 [N]: row r of every TAC layer takes the Q, K of row tac_src[r] (unet only)
EPS = "eps"
DEEP = "deep"  # [B, C_1, h, w]: the features entering the last up block (unet_deep's output, unet_shallow's input)

# VAE graphs.
IMAGE = "image"  # [B, 3, H, W] in [-1, 1] (encoder input); [B, 3, H, W] in [0, 1] (decoder output)
LATENT = "latent"  # [B, C, h, w] (C = 4 in SD 1.x), scaled by the VAE's scaling factor

# Step graphs.
Z = "z"  # [B, C, h, w]
COEF = "coef"  # [3] float32: cz, ce, w (w unused by ddim_step)
Z_NEXT = "z_next"  # ddim_step output [B, C, h, w]
Z_PAIR = "z_pair"  # guided_step output [2B, C, h, w]: the next [zr, zr] batch
W_TEXT = "w_text"  # guided_text_step input [B] float32: each image's text guidance (0: no prompt)
Z_GROUP = "z_group"  # guided_text_step output [3B, C, h, w]: the next [zr, zr, zr] batch

# The prompt encoder beside the graphs (docs/design.md, "Prompts"): the model's text encoder, fp32, run once per
# distinct prompt; it is not a program graph (no engine, no canary: the bundle's c_null is what it must give for "").
TEXT_ENCODER = "text_encoder"
INPUT_IDS = "input_ids"  # int64 [B, 77]: the tokenizer's ids, padded
TEXT_EMBEDDINGS = "text_embeddings"  # [B, 77, d]: the conditioning of each prompt
TOKENIZER_DIR = "tokenizer"  # the tokenizer's files, as the model holds them

# Conditioning files in the bundle's cond/ folder.
COND_NULL = "c_null"
COND_NEG = "c_neg"


def tac_q(i: int) -> str:
    """Query projection of TAC layer i (UNet order), [B, N_i, C_i]."""
    return f"tac_q_{i}"


def tac_k(i: int) -> str:
    """Key projection of TAC layer i (UNet order), [B, N_i, C_i]."""
    return f"tac_k_{i}"


def key_level(level: int, pool: int) -> int:
    """The grid level of a TAC layer's key: its own, or with an attention pool at the first level, the level whose
    grid is that pooled one (a pool of 2 halves both sides, as one level down does)."""
    return level + pool.bit_length() - 1 if level == 0 else level


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


# A bundle's graphs take any size in its range: their spatial dimensions are expressions of HM and WM, the image's
# sides in units of the bundle's pixel multiple (8 per latent cell, times 2 per UNet downsampling), so that every
# UNet level has whole sides. A latent side is L*hm with L = multiple / 8; TAC Q/K are [B, h_l, w_l, C] per level l.
HM, WM = "hm", "wm"


def eval_dim(dim: int | str, env: Mapping[str, int]) -> int:
    """A manifest dimension's value: a size, or an expression over `env`'s symbols ("2*B", "4*hm", "hm*wm")."""
    if isinstance(dim, int):
        return dim

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return int(env[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"dimension {dim!r}: an integer expression over {sorted(env)} was expected")

    try:
        tree = ast.parse(dim.replace(" ", ""), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"dimension {dim!r}: not an integer expression") from exc
    return value(tree.body)


_OPS: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                               ast.FloorDiv: operator.floordiv}


def concrete_shape(shape: Sequence[int | str], env: Mapping[str, int]) -> tuple[int, ...]:
    """A manifest shape at the values of its symbols (B, hm, wm)."""
    return tuple(eval_dim(d, env) for d in shape)


def shape_env(batch: int, width: int, height: int, multiple: int) -> dict[str, int]:
    """The symbols' values for an image batch at width x height (sides multiples of the bundle's `multiple`)."""
    if width % multiple or height % multiple:
        raise ValueError(f"{width}x{height}: sides must be multiples of {multiple}")
    return {BATCH: batch, HM: height // multiple, WM: width // multiple}


# The values the coupled program binds to each graph's B, as multiples of the image batch: the routed UNet serves
# the inversion (B latents), the guided [neg, null] pair after the TAC window (2B) and the fused TAC step
# [cg, neg, null] (3B); with a prompt's text rows, the guided [neg, null, text] (3B) and the fused [cg, neg, null,
# text] (4B). Every other graph is called at its own symbols with B = the image batch. TensorRT profiles take their
# shapes from this; the scheduler's tests check that its program binds nothing else.
CALL_MULTIPLES: dict[str, tuple[int, ...]] = {**{g: (1,) for g in ALL_GRAPHS},
                                              **{g: (1, 2, 3, 4) for g in ROUTED_GRAPHS}}
