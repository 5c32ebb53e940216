"""LoRA files fused into a model before any stage sees it (`--lora FILE[:SCALE]`, repeatable).

The fused model is a diffusers directory in the cache, named by the base model's and the LoRAs' hashes and scales,
so the export, the runtime and the benchmarks take it as any other model. Loading and fusing are diffusers' own
(`load_lora_weights`, which reads the diffusers / PEFT and kohya key layouts, then `fuse_lora`); the files are read
with safetensors here and handed over as tensors, so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r2r.atomic import atomic_dir
from r2r.cache import cache_dir, made_once
from r2r.log import log
from r2r.models import (
    EMBEDDING_FILE,
    ModelLoadError,
    check_model_dir,
    sha256_file,
    sha256_tree,
    write_derived_defaults,
)

LORA_FILE = "r2r_loras.json"  # in a fused directory: its base and LoRAs


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora`: a .safetensors file and the scale its update is fused with."""

    path: Path
    scale: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """`FILE` or `FILE:SCALE`."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return LoraSpec(Path(head), float(tail))
        except ValueError:
            pass  # a ':' inside the path
    return LoraSpec(Path(text))


def check_lora(spec: LoraSpec) -> LoraSpec:
    """A LoRA file that can be read: a .safetensors file that exists (ModelLoadError naming it, else)."""
    if spec.path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{spec.path}: LoRAs are read from .safetensors only (never unpickled)")
    if not spec.path.is_file():
        raise ModelLoadError(f"{spec.path}: no such LoRA file")
    return spec


def fused_name(model_dir: Path, loras: list[LoraSpec]) -> str:
    h = hashlib.sha256(sha256_tree(model_dir).encode())
    for spec in loras:
        h.update(f"{sha256_file(spec.path)}:{spec.scale!r}".encode())
    return "lora-" + h.hexdigest()[:32]


def fuse_loras(model_dir: Path, loras: list[LoraSpec], progress: Callable[[str], None] = log) -> Path:
    """`model_dir` with `loras` fused into its UNet and text encoder: a directory in the cache, made once."""
    if not loras:
        return model_dir
    check_model_dir(model_dir)
    out = cache_dir() / "models" / fused_name(model_dir, loras)
    return made_once(out, LORA_FILE, lambda: fuse_into(model_dir, loras, out),
                     f"fusing {', '.join(s.path.name for s in loras)} into {model_dir}", progress)


def fuse_into(model_dir: Path, loras: list[LoraSpec], out: Path, keep_embedding: bool = True) -> Path:
    """Write `model_dir` with `loras` fused (diffusers' loaders) to `out`, atomically; `keep_embedding=False` for a
    trained LoRA (the base's negative embedding was learned against the old UNet)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, spec in zip(names, loras, strict=True):
        try:
            pipe.load_lora_weights(load_file(str(spec.path)), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:  # keys of another model, another architecture
            raise ModelLoadError(f"{spec.path}: cannot load it as a LoRA of this model ({exc})") from exc
    pipe.set_adapters(names, adapter_weights=[s.scale for s in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # the adapters' own layers go; the fused weights stay
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_derived_defaults(model_dir, tmp)  # the base model's size stays its size
        if keep_embedding and (model_dir / EMBEDDING_FILE).is_file():
            shutil.copyfile(model_dir / EMBEDDING_FILE, tmp / EMBEDDING_FILE)
        (tmp / LORA_FILE).write_text(json.dumps({
            "base": str(model_dir), "loras": [{"file": s.path.name, "sha256": sha256_file(s.path), "scale": s.scale}
                                              for s in loras]}, indent=2) + "\n")
    return out


__all__ = ["LORA_FILE", "LoraSpec", "check_lora", "fuse_into", "fuse_loras", "fused_name", "parse_lora"]
