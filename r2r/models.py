"""Model loading: diffusers-format SD-1.x directories and textual-inversion embeddings.

Weights are read from safetensors only (never unpickled) and only from local files: a directory
holding .bin/.ckpt weights alone is refused with a message naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import r2r
from r2r.config import MAX_CACHE_INTERVAL, SD15_DEFAULT_RESOLUTION
from r2r.errors import R2RError
from r2r.schedule import SchedulerConfig

EMBEDDED_DEFAULT = Path(r2r.__file__).resolve().parent / "embedded" / "tiny"
EMBEDDING_FILE = "negative_embedding.safetensors"
DEFAULTS_FILE = "r2r_defaults.json"  # a model's own defaults (`ModelDefaults`: the tiny default's 256x256)
DEFAULT_TOKEN = "<rendered>"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MAX_TOKENS = 77

# The SD 1.5 UNet configuration (architecture only; tests and benchmarks build random weights from it).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 512, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIP ViT-L/14's text tower; vocabulary and special ids are the tokenizer's (SD 1.x: r2r.checkpoints).
SD15_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


class ModelLoadError(R2RError, ValueError):
    """A model directory or embedding that cannot be used; the message names the file and the fix."""


@dataclass
class Components:
    """The loaded parts of an SD-1.x model that the method needs."""

    model_dir: Path
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: SchedulerConfig

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


@dataclass(frozen=True)
class ModelDefaults:
    """A model's own defaults, its r2r_defaults.json: the size it was trained at, and the step-cache interval its
    evaluation showed to hold the quality bar (docs/design.md, "Less work per image"). Absent: SD 1.5's public
    defaults, no step caching."""

    width: int = SD15_DEFAULT_RESOLUTION[0]
    height: int = SD15_DEFAULT_RESOLUTION[1]
    cache_interval: int = 1

    def resolution_only(self) -> dict[str, int]:
        """What a model derived from this one keeps (a LoRA fused, a checkpoint converted, a finetune): its size;
        the interval was measured on these weights, so theirs start from off."""
        return {"width": self.width, "height": self.height}


def model_defaults(model_dir: str | Path) -> ModelDefaults:
    """The model's r2r_defaults.json, checked (a hostile or hand-edited file is refused by name)."""
    path = Path(model_dir) / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        data = json.loads(path.read_text())
        found = ModelDefaults(int(data["width"]), int(data["height"]), int(data.get("cache_interval", 1)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a defaults file ({exc}); expected "
                             '{"width": W, "height": H[, "cache_interval": K]}') from exc
    if found.width % 8 or found.height % 8 or min(found.width, found.height) < 8 or \
            not 1 <= found.cache_interval <= MAX_CACHE_INTERVAL:
        raise ModelLoadError(f"{path}: width and height must be positive multiples of 8 and cache_interval in "
                             f"1..{MAX_CACHE_INTERVAL}, got {data}")
    return found


def default_resolution(model_dir: str | Path) -> tuple[int, int]:
    """(W, H): the model's r2r_defaults.json if it has one, else the public code's 768x1024."""
    found = model_defaults(model_dir)
    return found.width, found.height


def write_derived_defaults(model_dir: str | Path, out_dir: str | Path) -> None:
    """The defaults file of a model made from `model_dir`'s (`ModelDefaults.resolution_only`), if it has one."""
    if (Path(model_dir) / DEFAULTS_FILE).is_file():
        (Path(out_dir) / DEFAULTS_FILE).write_text(json.dumps(model_defaults(model_dir).resolution_only()) + "\n")


def check_model_dir(model_dir: str | Path) -> Path:
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model directory (a diffusers directory with {', '.join(COMPONENTS)})")
    for sub in COMPONENTS:
        if not (root / sub).is_dir():
            raise ModelLoadError(f"{root}: missing {sub}/; is this a diffusers-format SD 1.x directory?")
    for sub in ("unet", "vae", "text_encoder"):
        folder = root / sub
        if not any(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
            hint = f" (found {pickled[0]}; convert it to safetensors first)" if pickled else ""
            raise ModelLoadError(f"{folder}: no .safetensors weights{hint}; r2r never unpickles weights")
    return root


def load_components(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Components:
    """Load an SD-1.x diffusers directory from local safetensors files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_model_dir(model_dir)
    kw = {"local_files_only": True, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    scheduler = SchedulerConfig.from_model_dir(root)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelLoadError(
            f"{root}: unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder width "
            f"{text_encoder.config.hidden_size}; not an SD 1.x model"
        )
    for module in (unet, vae, text_encoder):
        module.to(device=device).eval().requires_grad_(False)
    return Components(root, unet, vae, text_encoder, tokenizer, scheduler)


def load_embedding(path: str | Path, hidden_size: int | None = None) -> tuple[str, torch.Tensor]:
    """Read a textual-inversion embedding (.safetensors only) in the layouts people have: diffusers' (one key, the
    token -> [n, d]) or A1111's (`emb_params`, or a `string_to_param.*` map of one entry; the token is the file's
    name, in angle brackets where the bare name is a word of the vocabulary: see `encode_conditioning`)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ModelLoadError(f"{p}: embeddings are read from .safetensors only (never unpickled)")
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such embedding file")
    try:
        with safe_open(str(p), framework="pt") as fh:
            keys = list(fh.keys())
            token, key = _embedding_key(p, keys)
            tensor = fh.get_tensor(key)
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types on malformed headers
        raise ModelLoadError(f"{p}: not a valid safetensors file ({exc})") from exc
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ModelLoadError(f"{p}: expected a float [n, d] tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    if not 1 <= tensor.shape[0] <= MAX_TOKENS - 2:
        raise ModelLoadError(f"{p}: {tensor.shape[0]} vectors; at most {MAX_TOKENS - 2} fit in a prompt")
    if hidden_size is not None and tensor.shape[1] != hidden_size:
        raise ModelLoadError(f"{p}: vectors of width {tensor.shape[1]}, the text encoder has {hidden_size}")
    if not torch.isfinite(tensor).all():
        raise ModelLoadError(f"{p}: contains non-finite values")
    return token, tensor.float()


def with_token(path: str | Path, token: str) -> Path:
    """The embedding at `path` under the token `token` (`--token`): its vectors in a diffusers one-key file in the
    cache, named by the file's hash and the token, made once; every stage then reads it as any embedding file. The
    token names the vectors only (the conditioning is the same under any token that tokenizes to itself)."""
    from safetensors.torch import save_file

    from r2r.atomic import atomic_dir
    from r2r.cache import cache_dir, made_once

    if not token or len(token) > 100 or any(c.isspace() or not c.isprintable() for c in token):
        raise ModelLoadError(f"--token {token!r}: one word of printable characters, at most 100")
    _, vectors = load_embedding(path)
    digest = hashlib.sha256(f"{sha256_file(path)}:{token}".encode()).hexdigest()[:32]
    out = cache_dir() / "embeddings" / digest

    def make() -> None:
        with atomic_dir(out) as tmp:
            save_file({token: vectors.contiguous()}, str(tmp / EMBEDDING_FILE))

    return made_once(out, EMBEDDING_FILE, make, f"{Path(path).name} under the token {token}", lambda s: None) \
        / EMBEDDING_FILE


def _embedding_key(path: Path, keys: list[str]) -> tuple[str, str]:
    """(token, tensor key) of an embedding file's layout."""
    if {"clip_l", "clip_g"} & set(keys):
        raise ModelLoadError(f"{path}: an SDXL embedding (clip_l / clip_g vectors); SD 1.x takes one CLIP-L set")
    a1111 = [k for k in keys if k == "emb_params" or k.startswith("string_to_param.")]
    if a1111:
        if len(a1111) != 1:
            raise ModelLoadError(f"{path}: an A1111 embedding with {len(a1111)} vector sets ({a1111[:4]}); "
                                 "expected one")
        return path.stem, a1111[0]
    if len(keys) != 1:
        raise ModelLoadError(f"{path}: expected one key (the token string, diffusers' layout) or A1111's "
                             f"emb_params / string_to_param, found {len(keys)}: {keys[:4]}")
    return keys[0], keys[0]


def placeholder_tokens(token: str, count: int) -> list[str]:
    """diffusers' multi-vector naming: token, token_1, ..., token_{count-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


@torch.no_grad()
def encode_conditioning(components: Components, embedding_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_null, c_neg), each [1, 77, d] float32, as docs/design.md, "Conditioning", defines them.

    The text encoder and tokenizer are copied before the placeholder rows are added, so the loaded
    components stay those of the model directory.
    """
    import copy

    te = components.text_encoder
    token, vectors = load_embedding(embedding_path, te.config.hidden_size)
    tokenizer = copy.deepcopy(components.tokenizer)
    text_encoder = copy.deepcopy(te).float().cpu()
    names = placeholder_tokens(token, vectors.shape[0])
    if any(n in tokenizer.get_vocab() for n in names) and not token.startswith("<"):
        names = placeholder_tokens(f"<{token}>", vectors.shape[0])  # a file named after a word: keep the word's id
    clash = [n for n in names if n in tokenizer.get_vocab()]
    if clash:
        raise ModelLoadError(f"{embedding_path}: token {clash[0]!r} already exists in the tokenizer")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are overwritten next
    text_encoder.get_input_embeddings().weight[ids] = vectors.to(text_encoder.dtype)

    def encode(prompt: str) -> torch.Tensor:
        tok = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return text_encoder(tok.input_ids)[0].float()

    c_null = encode("")
    neg_ids = tokenizer(" ".join(names), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
    if neg_ids[1 : 1 + len(ids)] != ids:
        raise ModelLoadError(f"{embedding_path}: placeholder tokens did not tokenize to their own ids")
    c_neg = encode(" ".join(names))
    return c_null, c_neg


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hash of a directory's files (relative names and contents), order-independent of the walk."""
    return sha256_trees(root, ())[0]


def sha256_trees(root: str | Path, parts: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(sha256_tree of `root`, sha256_tree of each sub-folder in `parts`), every file read once."""
    base = Path(root)
    files = sorted(q for q in base.rglob("*") if q.is_file())  # sorted as paths: a sub-folder's files in its order
    digests = {p: sha256_file(p) for p in files}

    def tree(folder: Path) -> str:
        h = hashlib.sha256()
        for p in files:
            if folder in p.parents:
                h.update(p.relative_to(folder).as_posix().encode() + b"\0" + digests[p].encode())
        return h.hexdigest()

    return tree(base), {part: tree(base / part) for part in parts}
