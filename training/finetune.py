"""Target-domain knowledge injection (paper eq. 6): finetune an SD-1.x UNet on captioned real images.

The loss is diffusers' text-to-image one: z0 = VAE latent sample * scaling_factor, a uniform timestep,
z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, MSE between the UNet's epsilon and eps. Text encoder and VAE
stay frozen; only the UNet trains, and the output is the input model directory with its UNet replaced
(`OUT/model/`, loadable by `StableDiffusionPipeline.from_pretrained`).

The data readers here (image folders with `metadata.jsonl`, optional latent caching, cached caption
conditioning) are shared with the negative embedding and the tiny model's pretraining.
"""

from __future__ import annotations

import json
import math
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from r2r.atomic import atomic_dir
from r2r.imageio import ImageReadError, load_rgb, oriented_size
from r2r.models import EMBEDDING_FILE, Components, load_components, write_derived_defaults
from r2r.schedule import alphas_cumprod, forward_noise
from r2r.tac import pixel_multiple
from r2r.training.loop import LoopConfig, LoopResult, TrainTask, WholeModuleTask, run_training

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "LORA_SUBDIR",
    "LORA_TARGETS",
    "LORA_WEIGHTS",
    "MODEL_SUBDIR",
    "CachedLatents",
    "CaptionEncoder",
    "DataError",
    "FinetuneConfig",
    "ImageFolder",
    "LatentSource",
    "LoraUNetTask",
    "OnlineLatents",
    "TimestepSampler",
    "UNetTask",
    "aspect_buckets",
    "bucketed_loss",
    "by_size",
    "cache_latents",
    "finetune",
    "nearest_bucket",
    "resolve_folder",
    "save_model_with",
    "save_model_with_unet",
]

MODEL_SUBDIR = "model"  # finetune writes OUT/model/ (a diffusers directory) next to OUT/checkpoints/
LORA_SUBDIR = "lora"  # finetune --lora-rank also writes OUT/lora/ (the LoRA alone, diffusers' layout)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
# The UNet layers a LoRA adapts: every attention projection (diffusers' text-to-image LoRA recipe).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
METADATA_FILE = "metadata.jsonl"
# Files of a source model directory that do not belong to a finetuned copy: the embedding was trained
# for the old UNet, checkpoints and logs are training by-products.
_NOT_COPIED = {EMBEDDING_FILE, "checkpoints", "log.jsonl"}


class DataError(ValueError):
    """A training folder that cannot be used; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def resolve_folder(data: str | Path, domain: str) -> Path:
    """An image folder with metadata.jsonl: `data` itself, or `data/train/<domain>` of an r2r dataset."""
    root = Path(data)
    for cand in (root, root / "train" / domain):
        if (cand / METADATA_FILE).is_file():
            return cand
    raise DataError(
        f"{root}: no {METADATA_FILE} here nor in {root / 'train' / domain}; pass a folder of images with a "
        f"{METADATA_FILE} ({{\"file_name\": ..., \"text\": ...}} per line), e.g. one made by `r2r-train data`"
    )


def aspect_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> tuple[tuple[int, int], ...]:
    """Training sizes (W, H) of about resolution x resolution pixels, sides multiples of `multiple`, aspect up to
    `max_ratio` either way (the aspect-ratio buckets of diffusers' and kohya's SD trainers)."""
    area, out = resolution * resolution, set()
    for w in range(multiple, int(resolution * math.sqrt(max_ratio)) + multiple + 1, multiple):
        h = area // w // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
    return tuple(sorted(out))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is closest to width:height (log ratio), the larger one on a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _oriented_size(path: Path) -> tuple[int, int]:
    """An image's (W, H) after its EXIF orientation, from its header."""
    try:
        return oriented_size(path)
    except ImageReadError as exc:
        raise DataError(str(exc)) from exc


@dataclass(frozen=True)
class ImageFolder:
    """Images and captions listed by a folder's metadata.jsonl (the diffusers imagefolder layout).

    Each item is served at its `sizes` entry: with aspect buckets, the bucket closest to its aspect; without,
    resolution x resolution."""

    folder: Path
    files: tuple[str, ...]
    captions: tuple[str, ...]
    resolution: int
    sizes: tuple[tuple[int, int], ...] = ()  # per item (W, H); empty: every item square

    @classmethod
    def open(cls, folder: str | Path, resolution: int, multiple: int | None = None) -> ImageFolder:
        """`multiple`: serve each image at its aspect bucket (sides multiples of it, about resolution^2 pixels);
        None: centre-cropped squares."""
        folder = Path(folder)
        meta = folder / METADATA_FILE
        if not meta.is_file():
            raise DataError(f"{meta}: missing; every training folder needs one line per image")
        files, captions = [], []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = str(row["file_name"]), str(row.get("text", ""))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}} ({exc})") from exc
            path = (folder / name).resolve()
            if path.parent != folder.resolve() and folder.resolve() not in path.parents:
                raise DataError(f"{meta}:{n}: {name!r} points outside {folder}")
            if not path.is_file():
                raise DataError(f"{meta}:{n}: {folder / name} does not exist; fix the line or add the image")
            files.append(name)
            captions.append(text)
        if not files:
            raise DataError(f"{meta}: lists no image")
        if resolution < 8 or resolution % 8:
            raise DataError(f"resolution {resolution} must be a positive multiple of 8")
        sizes: tuple[tuple[int, int], ...] = ()
        if multiple is not None:
            buckets = aspect_buckets(resolution, multiple)
            sizes = tuple(nearest_bucket(*_oriented_size(folder / f), buckets) for f in files)
        return cls(folder, tuple(files), tuple(captions), resolution, sizes)

    def __len__(self) -> int:
        return len(self.files)

    def size(self, i: int) -> tuple[int, int]:
        """(W, H) item i is served at."""
        return self.sizes[i] if self.sizes else (self.resolution, self.resolution)

    def image(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3] at `size(i)`: resized to cover it (bicubic, aspect kept), then centre-cropped."""
        from PIL import Image

        path = self.folder / self.files[i]
        try:
            rgb = load_rgb(path)
        except ImageReadError as exc:
            raise DataError(str(exc)) from exc
        h, w = rgb.shape[:2]
        bw, bh = self.size(i)
        if (w, h) != (bw, bh):
            scale = max(bw / w, bh / h)
            nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
            im = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - bw) // 2, (nh - bh) // 2
            rgb = np.asarray(im.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
        return rgb


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [B, 3, H, W] in [-1, 1] (docs/design.md, "Preprocess")."""
    import torch

    from r2r.imageio import to_model_input

    return torch.from_numpy(np.stack([to_model_input(im) for im in images]))


class LatentSource(ABC):
    """Scaled VAE latents z0 of dataset items, sampled from the encoder's distribution."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def size_of(self, i: int) -> tuple[int, ...]:
        """The size item i's latent has (items of one size can share a batch)."""

    @abstractmethod
    def latents(self, indices: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor: ...


class OnlineLatents(LatentSource):
    """Encodes each batch with the frozen VAE (what diffusers' scripts do)."""

    def __init__(self, images: ImageFolder, vae: nn.Module, scaling_factor: float) -> None:
        self.images, self.vae, self.scaling_factor = images, vae, scaling_factor

    def __len__(self) -> int:
        return len(self.images)

    def size_of(self, i: int) -> tuple[int, ...]:
        return self.images.size(i)

    def latents(self, indices: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        x = images_to_tensor([self.images.image(i) for i in indices])
        dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            params = self.vae.encode(x.to(device, dtype)).latent_dist.parameters.float().cpu()
        return (DiagonalGaussianDistribution(params).sample(generator) * self.scaling_factor).to(device)


class CachedLatents(LatentSource):
    """The VAE's posterior parameters computed once, [N, 2C, h, w] (or one [2C, h, w] per item where items have
    several sizes); each batch samples from them.

    Exact for a frozen VAE without augmentation; trades memory for not running the VAE every step.
    With `crop`, each sample is a random crop x crop window of its latent (the UNet is convolutional;
    on a CPU budget, windows teach local texture at a fraction of a full latent's cost).
    """

    def __init__(self, params: torch.Tensor | Sequence[torch.Tensor], scaling_factor: float,
                 crop: int | None = None) -> None:
        self.params, self.scaling_factor, self.crop = params, scaling_factor, crop
        smallest = min(min(p.shape[-2:]) for p in params)
        if crop is not None and not 1 <= crop <= smallest:
            raise ValueError(f"latent crop {crop} does not fit latents of side {smallest}")

    def __len__(self) -> int:
        return len(self.params)

    def size_of(self, i: int) -> tuple[int, ...]:
        return tuple(self.params[i].shape[-2:])

    def subset(self, rows: Sequence[int], crop: int | None = None) -> CachedLatents:
        if isinstance(self.params, Sequence):
            return CachedLatents([self.params[r] for r in rows], self.scaling_factor, crop)
        return CachedLatents(self.params[list(rows)], self.scaling_factor, crop)

    def latents(self, indices: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        params = (torch.stack([self.params[i] for i in indices]) if isinstance(self.params, Sequence)
                  else self.params[list(indices)])
        if self.crop is not None and self.crop < max(params.shape[-2:]):
            h, w, c = params.shape[-2], params.shape[-1], self.crop
            ys = torch.randint(0, h - c + 1, (len(indices),), generator=generator).tolist()
            xs = torch.randint(0, w - c + 1, (len(indices),), generator=generator).tolist()
            params = torch.stack([p[:, y : y + c, x : x + c] for p, y, x in zip(params, ys, xs, strict=True)])
        return (DiagonalGaussianDistribution(params).sample(generator) * self.scaling_factor).to(device)


def cache_latents(images: ImageFolder, vae: nn.Module, scaling_factor: float, batch_size: int = 16,
                  progress: bool = True, desc: str = "cache latents") -> CachedLatents:
    """Encode a whole folder once (posterior mean and log-variance, float32, CPU), in batches of one size."""
    import torch
    from tqdm import tqdm

    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    batches = [g[k:k + batch_size] for g in by_size(range(len(images)), images.size)
               for k in range(0, len(g), batch_size)]
    rows: list[torch.Tensor | None] = [None] * len(images)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        x = images_to_tensor([images.image(i) for i in batch])
        with torch.no_grad():
            params = vae.encode(x.to(device, dtype)).latent_dist.parameters.float().cpu()
        for i, p in zip(batch, params, strict=True):
            rows[i] = p
    done = [r for r in rows if r is not None]
    if len({tuple(r.shape) for r in done}) == 1:
        return CachedLatents(torch.stack(done), scaling_factor)
    return CachedLatents(done, scaling_factor)


def by_size(indices: Iterable[int], size_of: Callable[[int], tuple[int, ...]]) -> list[list[int]]:
    """`indices` grouped by size, groups in order of first appearance: one group when all share a size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(size_of(i), []).append(i)
    return list(groups.values())


def bucketed_loss(indices: list[int], size_of: Callable[[int], tuple[int, ...]],
                  loss: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """The batch's mean loss over items of several sizes: each size's items as one batch, the per-size means
    weighted by their share of the batch (the mean over items, since each item's loss is a mean over its own
    pixels). A batch of one size is one call, exactly as without buckets; the data order (and so resuming) does not
    depend on the buckets."""
    groups = by_size(indices, size_of)
    if len(groups) == 1:
        return loss(indices)
    total = loss(groups[0]) * (len(groups[0]) / len(indices))
    for g in groups[1:]:
        total = total + loss(g) * (len(g) / len(indices))
    return total


class CaptionEncoder:
    """Frozen text-encoder conditioning [B, 77, d] of captions ("" = c_null: padded, not zeros; docs/design.md).

    With `cache`, each distinct caption is encoded once (exact: the encoder is frozen).
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, cache: bool = False) -> None:
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, cache
        self._memo: dict[str, torch.Tensor] = {}

    def _encode(self, texts: list[str]) -> torch.Tensor:
        import torch

        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            return self.text_encoder(tok.input_ids.to(device))[0]

    def __call__(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        import torch

        if not self.cache:
            return self._encode(list(texts)).to(device)
        new = sorted({t for t in texts if t not in self._memo})
        if new:
            for t, e in zip(new, self._encode(new), strict=True):
                self._memo[t] = e.cpu()
        return torch.stack([self._memo[t] for t in texts]).to(device)


@dataclass(frozen=True)
class TimestepSampler:
    """Uniform training timesteps, optionally with a share drawn from a range (diffusers' timestep bias).

    `bias_portion` of each batch comes from [bias_begin, bias_end): useful when a model is only ever
    used for img2img at low strength (the tiny default), where high-noise timesteps are never sampled.
    """

    num_train_timesteps: int = 1000
    bias_portion: float = 0.0
    bias_begin: int = 0
    bias_end: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.bias_portion <= 1.0:
            raise ValueError(f"timestep bias portion must be in [0, 1], got {self.bias_portion}")
        if not 0 <= self.bias_begin < self.bias_end <= self.num_train_timesteps:
            raise ValueError(f"timestep bias range [{self.bias_begin}, {self.bias_end}) is not within "
                             f"[0, {self.num_train_timesteps})")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        import torch

        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        if self.bias_portion > 0:
            biased = torch.randint(self.bias_begin, self.bias_end, (n,), generator=generator)
            pick = torch.rand(n, generator=generator) < self.bias_portion
            t = torch.where(pick, biased, t)
        return t


def diffusion_loss(unet: nn.Module, z0: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor,
                   timesteps: TimestepSampler, generator: torch.Generator) -> torch.Tensor:
    """Paper eqs. 6/7: MSE between the UNet's epsilon and the noise added at a random timestep."""
    import torch
    import torch.nn.functional as F

    b = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    t = timesteps.sample(b, generator).to(z0.device)
    a = alphas.to(z0.device)[t].view(b, 1, 1, 1).to(z0.dtype)
    pred = unet(forward_noise(z0, noise, a), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), noise.float())


def scheduler_alphas(components: Components) -> torch.Tensor:
    """alphas_cumprod of the model's own noise schedule (r2r.schedule, the one definition)."""
    import torch

    return torch.from_numpy(alphas_cumprod(components.scheduler).copy())


# --------------------------------------------------------------------------------------------------
# The finetune task
# --------------------------------------------------------------------------------------------------


def save_model_with(source: Path, parts: dict[str, nn.Module], out_dir: Path) -> Path:
    """A copy of diffusers directory `source` with `parts` (e.g. {"unet": unet}) replaced, written atomically.

    The source's negative embedding is not copied: it was trained against the old weights.
    """
    with atomic_dir(out_dir) as tmp:
        for item in sorted(Path(source).iterdir()):
            if item.name in _NOT_COPIED or item.name in parts or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for name, module in parts.items():
            module.save_pretrained(tmp / name, safe_serialization=True)
        write_derived_defaults(source, tmp)  # new weights: the source's size, not its measured settings
    return out_dir


def save_model_with_unet(source: Path, unet: nn.Module, out_dir: Path) -> Path:
    """`save_model_with` for the finetune: only the UNet changes."""
    return save_model_with(source, {"unet": unet}, out_dir)


class UNetTask(WholeModuleTask):
    """Epsilon-prediction training of a UNet on (latent, caption) pairs; text encoder and VAE frozen.

    An item's caption may be a list of alternatives, one drawn per step.
    """

    name = "finetune"

    def __init__(self, components: Components, latents: LatentSource, captions: Sequence[str | Sequence[str]],
                 text: CaptionEncoder, timesteps: TimestepSampler, caption_dropout: float = 0.0,
                 gradient_checkpointing: bool = False, fingerprint: dict[str, Any] | None = None,
                 name: str = "finetune") -> None:
        if len(captions) != len(latents):
            raise ValueError(f"{len(captions)} captions for {len(latents)} latents")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption dropout must be in [0, 1], got {caption_dropout}")
        self.c, self.source, self.captions, self.text = components, latents, list(captions), text
        self.timesteps, self.caption_dropout = timesteps, caption_dropout
        self.gradient_checkpointing = gradient_checkpointing
        self._fingerprint = fingerprint or {}
        self.name = name
        self.alphas = scheduler_alphas(components)

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def fingerprint(self) -> dict[str, Any]:
        return {**self._fingerprint, "num_samples": len(self.source), "caption_dropout": self.caption_dropout,
                "timesteps": vars(self.timesteps)}

    def build(self, device: torch.device) -> nn.Module:
        self.c.vae.to(device)
        self.c.text_encoder.to(device)
        unet = self.c.unet.to(device).float().train().requires_grad_(True)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return bucketed_loss(indices, self.source.size_of, lambda group: self._loss(module, group, generator))

    def _loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        import torch

        device = next(module.parameters()).device
        z0 = self.source.latents(indices, generator, device)
        caps = []
        for i in indices:
            cap = self.captions[i]
            if not isinstance(cap, str):  # several captions for one image: one at random (diffusers' rule)
                cap = cap[int(torch.randint(0, len(cap), (1,), generator=generator))]
            caps.append(cap)
        if self.caption_dropout > 0:
            drop = (torch.rand(len(caps), generator=generator) < self.caption_dropout).tolist()
            caps = ["" if d else c for c, d in zip(caps, drop, strict=True)]
        cond = self.text(caps, device)
        return diffusion_loss(module, z0, cond, self.alphas, self.timesteps, generator)

    def save_final(self, module: nn.Module, out: Path) -> Path:
        module.eval()
        return save_model_with_unet(self.c.model_dir, module, Path(out) / MODEL_SUBDIR)


class LoraUNetTask(UNetTask):
    """The same finetune as a LoRA of rank `rank` on the UNet's attention projections (PEFT): the base weights frozen,
    only the adapter's A and B trained and checkpointed (what fits one GPU for SD 1.5). Writes OUT/lora (the LoRA,
    which `--lora` takes) and OUT/model (the base with it fused, as the whole-UNet finetune writes)."""

    trainable_state = TrainTask.trainable_state  # the adapter's tensors only, not the frozen UNet
    load_trainable_state = TrainTask.load_trainable_state

    def __init__(self, *args: Any, rank: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "lora_rank": self.rank}

    def build(self, device: torch.device) -> nn.Module:
        from peft import LoraConfig

        unet = super().build(device).requires_grad_(False)  # the base frozen; the adapter added next trains
        unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=list(LORA_TARGETS)))
        return unet

    def save_final(self, module: nn.Module, out: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        from r2r.lora import LoraSpec, fuse_into

        module.eval()
        with atomic_dir(Path(out) / LORA_SUBDIR) as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(module),
                                                      safe_serialization=True)
        lora = Path(out) / LORA_SUBDIR / LORA_WEIGHTS
        return fuse_into(self.c.model_dir, [LoraSpec(lora)], Path(out) / MODEL_SUBDIR, keep_embedding=False)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """`r2r-train finetune`: model, real images with captions, output, loop options and data options."""

    model: Path
    data: Path
    out: Path
    loop: LoopConfig = field(default_factory=LoopConfig)
    resolution: int | None = None  # default: the model's r2r_defaults.json width, else 512
    buckets: bool = True  # aspect-ratio buckets of about resolution^2 pixels; False: centre-cropped squares
    caption_dropout: float = 0.0
    cache_latents: bool = False
    gradient_checkpointing: bool = False
    timestep_bias_portion: float = 0.0
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    domain: str = "real"  # which folder of an r2r dataset root --data points to
    lora_rank: int | None = None  # train a LoRA of this rank instead of the whole UNet


def default_train_resolution(model_dir: Path) -> int:
    """The model's own square side if it declares one (the tiny default: 256), else SD 1.5's 512."""
    from r2r.models import DEFAULTS_FILE, model_defaults

    if (Path(model_dir) / DEFAULTS_FILE).is_file():
        found = model_defaults(model_dir)
        return min(found.width, found.height)
    return 512


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen parts (VAE, text encoder) under mixed precision, as diffusers' scripts do."""
    import torch

    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def finetune(cfg: FinetuneConfig) -> LoopResult:
    """Run (or resume) the finetune; returns the loop's result, whose `output` is `OUT/model`."""
    folder = resolve_folder(cfg.data, cfg.domain)
    res = cfg.resolution or default_train_resolution(cfg.model)
    comps = load_components(cfg.model)
    images = ImageFolder.open(folder, res, pixel_multiple(comps.unet.config) if cfg.buckets else None)
    frozen = weight_dtype(cfg.loop.mixed_precision)
    if frozen != comps.vae.dtype:
        comps.vae.to(dtype=frozen)
        comps.text_encoder.to(dtype=frozen)
    if cfg.cache_latents:
        source: LatentSource = cache_latents(images, comps.vae, comps.scaling_factor, progress=cfg.loop.progress)
    else:
        source = OnlineLatents(images, comps.vae, comps.scaling_factor)
    text = CaptionEncoder(comps.tokenizer, comps.text_encoder, cache=cfg.cache_latents)
    n = comps.scheduler.num_train_timesteps
    timesteps = TimestepSampler(n, cfg.timestep_bias_portion, cfg.timestep_bias_begin, min(cfg.timestep_bias_end, n))
    fingerprint = {"model": str(Path(cfg.model).resolve()), "data": str(folder.resolve()), "resolution": res,
                   **({"buckets": sorted(set(images.sizes))} if images.sizes else {})}
    args = (comps, source, images.captions, text, timesteps, cfg.caption_dropout, cfg.gradient_checkpointing)
    task = (LoraUNetTask(*args, rank=cfg.lora_rank, fingerprint=fingerprint) if cfg.lora_rank
            else UNetTask(*args, fingerprint=fingerprint))
    return run_training(task, cfg.loop, cfg.out)
