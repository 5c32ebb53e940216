"""Single-file checkpoints (the original LDM layout A1111, ComfyUI and kohya write) as diffusers directories.

Every `--model` goes through `resolve_model`: a diffusers directory is used as it is; an SD 1.x or tiny-family
`.safetensors` checkpoint is converted once, offline, into the cache under its sha256. Other architectures are
refused by what they are; pickled files (.ckpt, .pt, .pth, .bin) are never opened.
Why: docs/design.md, "Model and Domain Knowledge Injection".
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r2r.atomic import atomic_dir, atomic_write
from r2r.cache import cache_dir, made_once
from r2r.log import log
from r2r.models import (
    DEFAULTS_FILE,
    EMBEDDED_DEFAULT,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    ModelLoadError,
    sha256_file,
    write_derived_defaults,
)

PICKLED = (".ckpt", ".pt", ".pth", ".bin")
SOURCE_FILE = "r2r_checkpoint.json"  # in a converted directory: what it was converted from
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
CLIP_VOCAB = 49408  # CLIP's: 256 bytes, 256 bytes + "</w>", 48,894 merges, two special tokens
CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
CONVERT_HINT = (
    "convert it to .safetensors where you trust the file (r2r never unpickles): python -c \"import torch, "
    "safetensors.torch as s; sd = torch.load('{src}', map_location='cpu', weights_only=True); "
    "s.save_file(sd.get('state_dict', sd), '{dst}')\""
)


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint's shapes say it is: the UNet's input channels and width, the text width and vocabulary."""

    family: str
    in_channels: int
    unet_width: int
    context: int
    vocab: int


SD1 = Architecture("SD 1.x", 4, SD15_UNET_CONFIG["block_out_channels"][0], SD15_TEXT_CONFIG["hidden_size"], CLIP_VOCAB)


def tiny_architecture() -> Architecture:
    """The tiny family's, from the embedded default's configs."""
    unet = json.loads((EMBEDDED_DEFAULT / "unet" / "config.json").read_text())
    text = json.loads((EMBEDDED_DEFAULT / "text_encoder" / "config.json").read_text())
    return Architecture("tiny", unet["in_channels"], unet["block_out_channels"][0], text["hidden_size"],
                        text["vocab_size"])


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118  (not a dict)
    except Exception as exc:  # safetensors raises its own types on a malformed header
        raise ModelLoadError(f"{path}: not a valid safetensors file ({exc})") from exc


def identify(path: Path, shapes: dict[str, tuple[int, ...]]) -> Architecture:
    """The architecture of a checkpoint's tensors, or ModelLoadError saying what it is and what r2r takes."""
    names = list(shapes)
    supported = "r2r takes SD 1.x checkpoints (and the tiny family of its embedded default)"

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    if has("conditioner.embedders."):
        raise ModelLoadError(f"{path}: an SDXL checkpoint (two text encoders under conditioner.embedders); {supported}")
    if has("text_encoders.") or has(UNET + "joint_blocks.") or has(UNET + "double_blocks.") or has("double_blocks."):
        raise ModelLoadError(f"{path}: an SD3 / Flux transformer checkpoint, not a UNet; {supported}")
    if has("cond_stage_model.model.transformer."):
        raise ModelLoadError(f"{path}: an SD 2.x checkpoint (OpenCLIP ViT-H text encoder; the 768 models predict v, "
                             f"not epsilon); {supported}")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9:
        raise ModelLoadError(f"{path}: an inpainting UNet (9 input channels: latent, mask, masked image); {supported}")
    missing = [part for part, key in (("the UNet", UNET + "input_blocks.0.0.weight"),
                                      ("the VAE", VAE + "encoder.conv_in.weight"),
                                      ("the CLIP text encoder", CLIP + "text_model.embeddings.token_embedding.weight"))
               if key not in shapes]
    if missing:
        raise ModelLoadError(f"{path}: not a complete SD 1.x checkpoint: {', '.join(missing)} missing (a UNet-only "
                             f"or LoRA file? LoRAs go to --lora); {supported}")
    assert conv_in is not None
    vocab, context = shapes[CLIP + "text_model.embeddings.token_embedding.weight"]
    found = Architecture("", conv_in[1], conv_in[0], context, vocab)
    for arch in (SD1, tiny_architecture()):
        if (found.in_channels, found.unet_width, found.context, found.vocab) == (
                arch.in_channels, arch.unet_width, arch.context, arch.vocab):
            return arch
    if found.unet_width == SD1.unet_width and found.in_channels != SD1.in_channels:
        raise ModelLoadError(f"{path}: a UNet with {found.in_channels} input channels (SD 1.x has 4: an "
                             f"instruct-pix2pix or depth model?); {supported}")
    raise ModelLoadError(f"{path}: an LDM checkpoint of an unknown size (UNet {found.in_channels} -> "
                         f"{found.unet_width} channels, text width {found.context}, vocabulary {found.vocab}); "
                         f"{supported}")


def clip_bpe_file() -> Path:
    """CLIP's BPE merges as the open-clip-torch package ships them (the package is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / CLIP_BPE).is_file():
                return Path(folder) / CLIP_BPE
    raise ModelLoadError("SD 1.x checkpoints need CLIP's tokenizer vocabulary, which r2r reads from the "
                         "open-clip-torch package: pip install --no-deps open-clip-torch (its file only is read)")


def build_clip_tokenizer(out_dir: Path) -> Path:
    """SD 1.x's tokenizer (CLIP ViT-L/14's: 49,408 ids) written to `out_dir` from CLIP's BPE merges."""
    from r2r.tiny import write_clip_tokenizer

    lines = gzip.decompress(clip_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB - 512 - 2 + 1]]  # after the version line
    if len(merges) != CLIP_VOCAB - 514 or any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{clip_bpe_file()}: not CLIP's BPE merges file")
    return write_clip_tokenizer(out_dir, merges, do_lower_case=True)  # type: ignore[arg-type]


def write_configs(arch: Architecture, out: Path) -> Path:
    """A diffusers folder of configs without weights (what `from_single_file(config=...)` reads), tokenizer
    included."""
    if arch.family == "tiny":
        for name in (DEFAULTS_FILE, "model_index.json", "unet/config.json", "vae/config.json",
                     "text_encoder/config.json", "scheduler/scheduler_config.json"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EMBEDDED_DEFAULT / name, out / name)
        shutil.copytree(EMBEDDED_DEFAULT / "tokenizer", out / "tokenizer")
        return out
    from r2r.tiny import scheduler_kwargs

    configs = {
        "model_index.json": json.loads((EMBEDDED_DEFAULT / "model_index.json").read_text()),
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG},
        "vae/config.json": {"_class_name": "AutoencoderKL", **SD15_VAE_CONFIG},
        # SD 1.5's published text-encoder config: its special ids are CLIP's originals, not the tokenizer's
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                     **SD15_TEXT_CONFIG, "vocab_size": CLIP_VOCAB, "bos_token_id": 0,
                                     "eos_token_id": 2, "pad_token_id": 1},
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", **scheduler_kwargs()},
    }
    for name, data in configs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    build_clip_tokenizer(out / "tokenizer")
    return out


def convert_checkpoint(path: Path, out: Path, arch: Architecture, sha256: str) -> Path:
    """`path` as a diffusers directory at `out` (written whole or not at all)."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory(prefix="r2r-configs-") as tmp:
        configs = write_configs(arch, Path(tmp))
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(configs), local_files_only=True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{path}: diffusers could not convert it as {arch.family} ({exc})") from exc
        with atomic_dir(out) as tmp_out:
            pipe.save_pretrained(tmp_out, safe_serialization=True)
            write_derived_defaults(configs, tmp_out)  # the family's own default size (the tiny one's 256x256)
            atomic_write(tmp_out / SOURCE_FILE, json.dumps(
                {"checkpoint": path.name, "sha256": sha256, "family": arch.family}, indent=2) + "\n")
    return out


def resolve_model(path: str | Path, progress: Callable[[str], None] = log) -> Path:
    """A `--model` as a diffusers directory: a directory as it is, a .safetensors checkpoint converted once into the
    cache (by its sha256)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.suffix.lower() in PICKLED:
        hint = CONVERT_HINT.format(src=p, dst=p.with_suffix(".safetensors"))
        raise ModelLoadError(f"{p}: a pickled checkpoint; {hint}")
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such model (a diffusers directory or a .safetensors checkpoint)")
    if p.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{p}: a model is a diffusers directory or a .safetensors checkpoint")
    arch = identify(p, read_header(p))
    sha256 = sha256_file(p)
    out = cache_dir() / "models" / sha256[:32]
    return made_once(out, SOURCE_FILE, lambda: convert_checkpoint(p, out, arch, sha256),
                     f"converting {p.name} ({arch.family} checkpoint)", progress)


def model_option(ctx: object, param: object, value: Path | None) -> Path | None:
    """click callback of every `--model`: a checkpoint is converted (once) before the command runs."""
    import click

    if value is None:
        return None
    try:
        return resolve_model(value)
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc)) from exc


__all__ = ["PICKLED", "SD1", "SOURCE_FILE", "Architecture", "build_clip_tokenizer", "clip_bpe_file",
           "convert_checkpoint", "identify", "model_option", "read_header", "resolve_model", "tiny_architecture",
           "write_configs"]
