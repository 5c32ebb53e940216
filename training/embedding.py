"""Source-domain knowledge injection (paper eq. 7): the 75-vector negative domain embedding.

The prompt is the placeholder tokens alone (`<rendered> <rendered>_1 ... <rendered>_74`, no caption),
the images are renders, the model (the finetuned one) is frozen whole: only the 75 vectors train.

The vectors are a separate [n, d] parameter spliced into the text encoder's token-embedding output at
the placeholder positions (a forward hook), which is exactly what diffusers' textual inversion does at
inference after `load_textual_inversion` has appended the rows. So no weight of the text encoder, UNet
or VAE is ever touched (not even restored: the embedding table is not resized), the optimizer state is
[n, d], and the output is diffusers' textual-inversion file: one key, the token, holding [n, d].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r2r.atomic import atomic_path, atomic_write
from r2r.models import DEFAULT_TOKEN, EMBEDDING_FILE, MAX_TOKENS, Components, load_components, placeholder_tokens
from r2r.tac import pixel_multiple
from r2r.training.finetune import (
    CachedLatents,
    ImageFolder,
    LatentSource,
    OnlineLatents,
    TimestepSampler,
    bucketed_loss,
    cache_latents,
    default_train_resolution,
    diffusion_loss,
    resolve_folder,
    scheduler_alphas,
    weight_dtype,
)
from r2r.training.loop import LoopConfig, LoopResult, TrainTask, run_training

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DEFAULT_INIT_WORD", "EmbeddingConfig", "NegativeEmbeddingTask", "PlaceholderPrompt",
           "save_embedding", "train_negative_embedding"]

DEFAULT_INIT_WORD = "rendered"


def save_embedding(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers' textual-inversion format: safetensors, one key (the token), float32 [n, d]; atomic."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({token: vectors.detach().float().cpu().contiguous()}, str(tmp))
    return Path(path)


class PlaceholderPrompt:
    """Token ids of the placeholder-only prompt, tokenized as inference does (r2r.models.encode_conditioning).

    A copy of the tokenizer gets the placeholder names; the model's tokenizer is left as it was.
    """

    def __init__(self, tokenizer: Any, token: str, num_vectors: int) -> None:
        import torch

        if not 1 <= num_vectors <= MAX_TOKENS - 2:
            raise ValueError(f"--num-vectors must be in 1..{MAX_TOKENS - 2}, got {num_vectors}")
        self.names = placeholder_tokens(token, num_vectors)
        vocab = tokenizer.get_vocab()
        clash = [n for n in self.names if n in vocab]
        if clash:
            raise ValueError(f"token {clash[0]!r} already exists in the model's tokenizer; pick another --token")
        tok = copy.deepcopy(tokenizer)
        self.vocab_size = len(tok)
        tok.add_tokens(self.names)
        ids = tok.convert_tokens_to_ids(self.names)
        enc = tok(" ".join(self.names), padding="max_length", max_length=tok.model_max_length, truncation=True)
        input_ids = list(enc.input_ids)
        if input_ids[1 : 1 + num_vectors] != ids:
            raise ValueError(f"placeholder {token!r} does not tokenize to its own ids; pick a token without spaces")
        self.input_ids = torch.tensor([input_ids])
        self.positions = torch.arange(1, 1 + num_vectors)
        # Stand-in ids fed to the (un-resized) embedding table at placeholder positions; the hook
        # overwrites their rows.
        self.safe_ids = self.input_ids.clone()
        self.safe_ids[0, self.positions] = 0


def _make_module(text_encoder: nn.Module, prompt: PlaceholderPrompt, init: torch.Tensor) -> nn.Module:
    from torch import nn

    class NegativeConditioning(nn.Module):
        """c_neg = text encoder output of the placeholder prompt, with `vectors` at the placeholder rows."""

        def __init__(self) -> None:
            super().__init__()
            self.vectors = nn.Parameter(init.clone().float())
            self.text_encoder = text_encoder
            self.register_buffer("input_ids", prompt.safe_ids.clone(), persistent=False)
            self.register_buffer("positions", prompt.positions.clone(), persistent=False)

        def _splice(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            out[:, self.positions] = self.vectors.to(out.dtype)
            return out

        def forward(self) -> torch.Tensor:
            # The hook lives only for this call: the text encoder stays the model's own everywhere else.
            handle = self.text_encoder.get_input_embeddings().register_forward_hook(self._splice)
            try:
                return self.text_encoder(self.input_ids)[0]
            finally:
                handle.remove()

    return NegativeConditioning()


def initial_vectors(components: Components, num_vectors: int, init_word: str, noise: float,
                    seed: int) -> torch.Tensor:
    """All rows = the mean embedding of `init_word`'s tokens, plus seeded noise of `noise` x the table's std.

    A word of the domain ("rendered") starts the vectors where the encoder's inputs live; the noise only
    breaks the symmetry between rows. An empty word starts from the table's mean row.
    """
    import torch

    table = components.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    if init_word:
        ids = components.tokenizer(init_word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"--init-word {init_word!r} tokenizes to nothing")
        base = table[ids].mean(0)
    else:
        base = table.mean(0)
    gen = torch.Generator().manual_seed(seed)
    return base.expand(num_vectors, -1).clone() + noise * table.std() * torch.randn(num_vectors, table.shape[1],
                                                                                      generator=gen)


class NegativeEmbeddingTask(TrainTask):
    """Eq. 7: the noise-prediction loss on renders with the placeholder prompt; only its vectors train."""

    name = "negative-embedding"

    def __init__(self, components: Components, latents: LatentSource, token: str, num_vectors: int,
                 init: torch.Tensor, timesteps: TimestepSampler, fingerprint: dict[str, Any] | None = None) -> None:
        self.c, self.source, self.token = components, latents, token
        self.prompt = PlaceholderPrompt(components.tokenizer, token, num_vectors)
        self.init = init
        self.timesteps = timesteps
        self.alphas = scheduler_alphas(components)
        self._fingerprint = fingerprint or {}

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def fingerprint(self) -> dict[str, Any]:
        return {**self._fingerprint, "token": self.token, "num_vectors": len(self.prompt.names),
                "num_samples": len(self.source), "timesteps": vars(self.timesteps)}

    def build(self, device: torch.device) -> nn.Module:
        for m in (self.c.unet, self.c.vae, self.c.text_encoder):
            m.to(device).eval().requires_grad_(False)
        return _make_module(self.c.text_encoder, self.prompt, self.init).to(device)

    def loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return bucketed_loss(indices, self.source.size_of, lambda group: self._loss(module, group, generator))

    def _loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        device = module.vectors.device if hasattr(module, "vectors") else next(module.parameters()).device
        z0 = self.source.latents(indices, generator, device)
        cond = module()  # through the (possibly DDP-wrapped) module, so gradients synchronise
        cond = cond.expand(z0.shape[0], -1, -1).to(z0.dtype)
        return diffusion_loss(self.c.unet, z0, cond, self.alphas, self.timesteps, generator)

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"vectors": module.vectors.detach()}

    def load_trainable_state(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            module.vectors.copy_(tensors["vectors"])

    def save_final(self, module: nn.Module, out: Path) -> Path:
        return save_embedding(Path(out) / EMBEDDING_FILE, self.token, module.vectors)


@dataclass(frozen=True)
class EmbeddingConfig:
    """`r2r-train negative-embedding`: the (finetuned) model, renders, output and options."""

    model: Path
    data: Path
    out: Path
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=5e-4, adam_weight_decay=0.0))
    token: str = DEFAULT_TOKEN
    num_vectors: int = 75
    init_word: str = DEFAULT_INIT_WORD
    init_noise: float = 0.01
    resolution: int | None = None
    buckets: bool = True  # aspect-ratio buckets of about resolution^2 pixels; False: centre-cropped squares
    cache_latents: bool = False
    timestep_bias_portion: float = 0.0
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    domain: str = "rendered"


def train_negative_embedding(cfg: EmbeddingConfig, components: Components | None = None,
                             latents: LatentSource | None = None) -> LoopResult:
    """Run (or resume) the negative-embedding training; `output` is OUT/negative_embedding.safetensors.

    `components` / `latents` let a caller (the tiny pretraining) pass what it already holds.
    """
    comps = components or load_components(cfg.model)
    if latents is None:
        folder = resolve_folder(cfg.data, cfg.domain)
        images = ImageFolder.open(folder, cfg.resolution or default_train_resolution(cfg.model),
                                  pixel_multiple(comps.unet.config) if cfg.buckets else None)
        frozen = weight_dtype(cfg.loop.mixed_precision)
        if frozen != comps.vae.dtype:
            comps.vae.to(dtype=frozen)
            comps.text_encoder.to(dtype=frozen)
        if cfg.cache_latents:
            latents = cache_latents(images, comps.vae, comps.scaling_factor, progress=cfg.loop.progress)
        else:
            latents = OnlineLatents(images, comps.vae, comps.scaling_factor)
        data_key = str(folder.resolve())
        buckets = sorted(set(images.sizes))
    else:
        data_key, buckets = str(Path(cfg.data).resolve()), []
    init = initial_vectors(comps, cfg.num_vectors, cfg.init_word, cfg.init_noise, cfg.loop.seed)
    n = comps.scheduler.num_train_timesteps
    timesteps = TimestepSampler(n, cfg.timestep_bias_portion, cfg.timestep_bias_begin, min(cfg.timestep_bias_end, n))
    task = NegativeEmbeddingTask(comps, latents, cfg.token, cfg.num_vectors, init, timesteps,
                                 fingerprint={"model": str(Path(cfg.model).resolve()), "data": data_key,
                                              "init_word": cfg.init_word, "init_noise": cfg.init_noise,
                                              **({"buckets": buckets} if buckets else {})})
    result = run_training(task, cfg.loop, cfg.out)
    if result.completed:
        atomic_write(Path(cfg.out) / "embedding.json",
                          _provenance(cfg, result, isinstance(latents, CachedLatents)))
    return result


def _provenance(cfg: EmbeddingConfig, result: LoopResult, cached: bool) -> str:
    import json

    return json.dumps({"model": str(cfg.model), "data": str(cfg.data), "token": cfg.token,
                       "num_vectors": cfg.num_vectors, "init_word": cfg.init_word, "steps": result.step,
                       "cached_latents": cached, "seconds": round(result.seconds, 1)}, indent=2) + "\n"
