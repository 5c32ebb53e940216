"""`r2r-train pretrain-tiny`: the embedded default, trained from scratch on the procedural dataset.

Stages under OUT/ (`init/`, `vae/`, `latents.safetensors`, `unet/`, `finetune/`, `embedding/`, `base-embedding/`,
`embedded/`), each a resumable `run_training` skipped once its output exists, deterministic for a seed and
`--threads`; `embedded/` is the shipped default (model, negative embedding, training.json), copied by `--install`.
Why: docs/design.md, "Training the embedded default".
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r2r.atomic import atomic_dir, atomic_path
from r2r.models import DEFAULT_TOKEN, EMBEDDING_FILE, load_components
from r2r.tiny import LATENT_CHANNELS
from r2r.training.embedding import EmbeddingConfig, train_negative_embedding
from r2r.training.finetune import (
    MODEL_SUBDIR,
    CachedLatents,
    CaptionEncoder,
    DataError,
    ImageFolder,
    TimestepSampler,
    UNetTask,
    cache_latents,
    save_model_with,
)
from r2r.training.loop import LoopConfig, LoopResult, WholeModuleTask, run_training

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["PretrainConfig", "VAETask", "pretrain_tiny"]

LATENTS_FILE = "latents.safetensors"
# Appended to a share of the base model's captions (words the tiny tokenizer holds as single tokens).
DOMAIN_PHRASES = {"rendered": "3d render", "real": "studio photo"}
PROVENANCE_FILE = "training.json"
MODEL_CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class PretrainConfig:
    """All knobs of the tiny model's training; the defaults are the shipped default's recipe."""

    data: Path
    out: Path
    seed: int = 0
    threads: int | None = 2
    resume: bool = False
    progress: bool = True
    checkpoint_every: int = 100
    install: Path | None = None
    # VAE
    vae_steps: int = 4000
    vae_batch_size: int = 8
    vae_crop: int = 128
    vae_lr: float = 2e-4  # the carrier start is sensitive: larger steps wash its colour out
    vae_warmup: int = 50
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 0.25
    # UNet (base model)
    unet_steps: int = 2500
    unet_batch_size: int = 32
    unet_latent_crop: int | None = 16
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    unet_ema_decay: float = 0.998
    caption_dropout: float = 0.1
    domain_caption_portion: float = 0.5  # base model only: share of captions that name the domain
    timestep_bias_portion: float = 0.5
    timestep_bias_end: int = 400
    # DKI
    finetune_steps: int = 600
    finetune_batch_size: int = 16
    finetune_latent_crop: int | None = 24
    finetune_lr: float = 2e-4
    finetune_caption_dropout: float = 0.5  # the null text is what generation uses: half the steps teach it
    embedding_steps: int = 300
    embedding_batch_size: int = 16
    embedding_latent_crop: int | None = 24
    embedding_lr: float = 5e-3
    num_vectors: int = 75
    token: str = DEFAULT_TOKEN
    ablation: bool = True  # also train the base model's own embedding (the "without finetune" row)

    def as_json(self) -> dict[str, Any]:
        """The recipe, without this machine's paths (the provenance ships in the repository)."""
        skip = {"data", "out", "install", "resume", "progress"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# --------------------------------------------------------------------------------------------------
# VAE stage
# --------------------------------------------------------------------------------------------------


class VAETask(WholeModuleTask):
    """The autoencoder on in-memory uint8 images, at several scales (see `loss`)."""

    name = "pretrain-vae"

    def __init__(self, vae: nn.Module, images: torch.Tensor, crop: int, kl_weight: float, edge_weight: float,
                 fingerprint: dict[str, Any], scales: tuple[int, ...] = (4, 2, 1),
                 scale_probs: tuple[float, ...] = (0.2, 0.3, 0.5), carrier: bool = True) -> None:
        self.vae, self.images, self.crop = vae, images, crop
        self.scales, self.scale_probs, self.carrier = scales, scale_probs, carrier
        self.kl_weight, self.edge_weight = kl_weight, edge_weight
        self._fingerprint = fingerprint
        if crop % 8 or crop < 8:
            raise ValueError(f"vae crop {crop} must be a positive multiple of 8 (images larger than it are cropped)")

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> dict[str, Any]:
        return {**self._fingerprint, "crop": self.crop, "kl": self.kl_weight, "edge": self.edge_weight,
                "scales": self.scales, "scale_probs": self.scale_probs, "carrier": self.carrier}

    def build(self, device: torch.device) -> nn.Module:
        from torch import nn

        from r2r.training.vae_init import carrier_init

        if self.carrier:  # (a resumed run overwrites these weights from its checkpoint)
            carrier_init(self.vae)

        class Autoencode(nn.Module):
            """encode -> sample -> decode in one forward, so a DDP wrapper sees the whole computation."""

            def __init__(self, vae: nn.Module) -> None:
                super().__init__()
                self.vae = vae

            def forward(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[Any, ...]:
                post = self.vae.encode(x).latent_dist
                return self.vae.decode(post.sample(generator=generator)).sample, post

        return Autoencode(self.vae.to(device).float().train().requires_grad_(True)).to(device)

    def loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        # One scale per step: whole images area-downsampled 4x or 2x (cheap; shapes and shading with the
        # background in view) or full-resolution crops (the fine patterns).
        k = int(torch.multinomial(torch.tensor(self.scale_probs), 1, generator=generator))
        f = self.scales[k]
        x = self.images[list(indices)].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if f > 1:
            x = F.avg_pool2d(x, f)
        h, w = x.shape[-2:]
        c = min(self.crop, h, w)
        y0 = int(torch.randint(0, h - c + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, w - c + 1, (1,), generator=generator))
        device = next(module.parameters()).device
        x = x[..., y0 : y0 + c, x0 : x0 + c].contiguous().to(device)
        rec, post = module(x, generator if device.type == "cpu" else None)
        rec = rec.float()
        mse = (rec - x).pow(2).mean()
        edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        return mse + self.edge_weight * edge + self.kl_weight * kl

    def save_final(self, module: nn.Module, out: Path) -> Path:
        module.eval()
        final = Path(out) / "vae"
        with atomic_dir(final) as tmp:
            module.vae.save_pretrained(tmp, safe_serialization=True)
        return final


def _load_images(folders: list[ImageFolder], progress: bool) -> torch.Tensor:
    import numpy as np
    import torch
    from tqdm import tqdm

    total = sum(len(f) for f in folders)
    res = folders[0].resolution
    arr = np.empty((total, res, res, 3), dtype=np.uint8)
    k = 0
    with tqdm(total=total, desc="load images", unit="img", disable=not progress) as bar:
        for f in folders:
            for i in range(len(f)):
                arr[k] = f.image(i)
                k += 1
                bar.update()
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------------
# The pipeline of stages
# --------------------------------------------------------------------------------------------------


def _dataset_resolution(data: Path) -> int:
    info = Path(data) / "dataset.json"
    if not info.is_file():
        raise DataError(f"{info}: missing; --data must be a dataset made by `r2r-train data` (train/ and test/)")
    w, h = json.loads(info.read_text())["size"]
    if w != h:
        raise DataError(f"{info}: images are {w}x{h}; the tiny model trains on square images (e.g. --size 256x256)")
    return int(w)


def _loop(cfg: PretrainConfig, **kw: Any) -> LoopConfig:
    base = {"seed": cfg.seed, "resume": True, "progress": cfg.progress, "checkpoint_every": cfg.checkpoint_every,
            "checkpoints_total_limit": 1}
    return LoopConfig(**{**base, **kw})


def _save_latents(path: Path, params: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"params": params.contiguous()}, str(tmp), metadata={"r2r": json.dumps(meta)})


def _load_latents(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("params"), json.loads(fh.metadata()["r2r"])


def _drop_source_paths(model: Path) -> None:
    """diffusers records the folder a component was loaded from; the shipped default names none."""
    for cfg_file in model.glob("*/config.json"):
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if cfg.pop("_name_or_path", None) is not None:
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_card(prov: dict[str, Any]) -> str:
    """The shipped default's card, written from its provenance so that every figure comes from the run."""
    c, d, t = prov["config"], prov["dataset"], prov["stage_seconds"]
    stages = "\n".join(f"| {k} | {v / 60:.1f} |" for k, v in t.items())
    return f"""# The embedded default (tiny SD-1.x family)

A diffusers-format Stable Diffusion 1.x-family model small enough to ship in the repository, so that
the whole r2r flow runs on a fresh machine with no download. Architecture: `r2r/tiny.py` (UNet
32-64-64 channels with three latent levels at 256x256, VAE with factor 8 and {LATENT_CHANNELS} latent channels, a
2-layer CLIP text encoder with a locally built tokenizer). Default resolution 256x256.

Trained from scratch on the procedural dataset (`r2r-train data --count {d["count"]} --size
{d["size"][0]}x{d["size"][1]} --seed {d["seed"]}`: {d["splits"]["train"]} train pairs) by

    {prov["command"]}

(the stages are documented in `r2r/training/pretrain.py`): the VAE ({c["vae_steps"]} steps from the
colour-carrying start of `r2r/training/vae_init.py`), the base UNet on both domains ({c["unet_steps"]}
steps, text encoder frozen at its seeded init), then Domain Knowledge Injection: the UNet finetuned on
the real photos ({c["finetune_steps"]} steps) and the {c["num_vectors"]}-vector negative embedding
`{c["token"]}` learned on the renders with the finetuned model ({c["embedding_steps"]} steps). CPU time
on {prov["threads"]} thread(s) of a {prov["machine"]["processor"]} machine, torch {prov["machine"]["torch"]}:

| stage | minutes |
| --- | --- |
{stages}
| total | {prov["total_training_seconds"] / 60:.1f} |

Files: the diffusers directory, `negative_embedding.safetensors` (textual-inversion format), and
`training.json` (the full recipe and the stage times). Its evaluation (the paper's ablation on the
procedural test split) is in the repository's README, produced by `r2r-train evaluate`.

It is a demonstration model: 256x256, a few MB, trained on a CPU. Limits, seen in that evaluation's
grid and in the README demo's outputs: translations keep each garment's silhouette, colour and
pattern (stripes, dots and two-colour motifs with both colours) and take on the photographed
domain's fold shading and soft edges; the VAE (8 latent channels) still bounds texture: 11-18 px
lettering comes back as rows of letter-like marks or a mottled texture, not legible text, the finest
two-colour repeats (a pale gingham, a thin zigzag) fade or muddle, and two-colour dots at one latent
cell can pick up a third hue.
"""


def pretrain_tiny(cfg: PretrainConfig) -> Path:
    """Run every stage (resuming with `cfg.resume`); returns OUT/embedded (and installs it if asked)."""
    import torch

    from r2r.tiny import build_tiny_model
    from r2r.training.data import CAPTION_WORDS

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    res = _dataset_resolution(cfg.data)
    real_folder = ImageFolder.open(Path(cfg.data) / "train" / "real", res)
    rend_folder = ImageFolder.open(Path(cfg.data) / "train" / "rendered", res)
    times: dict[str, float] = {}
    prov_path = out / "stages.json"
    if prov_path.is_file():
        times = json.loads(prov_path.read_text())

    def record(stage: str, seconds: float) -> None:
        times[stage] = round(seconds, 1)
        prov_path.write_text(json.dumps(times, indent=2) + "\n")

    # 1. init
    init = out / "init"
    if not (init / "model_index.json").is_file():
        shutil.rmtree(init, ignore_errors=True)
        build_tiny_model(init, seed=cfg.seed, words=CAPTION_WORDS)

    # 2. VAE
    vae_run = out / "vae"
    if not (vae_run / "vae" / "config.json").is_file():
        comps = load_components(init)
        images = _load_images([rend_folder, real_folder], cfg.progress)
        task = VAETask(comps.vae, images, cfg.vae_crop, cfg.vae_kl_weight, cfg.vae_edge_weight,
                       {"data": str(Path(cfg.data).resolve()), "res": res})
        r = run_training(task, _loop(cfg, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr, max_steps=cfg.vae_steps,
                                     lr_warmup_steps=cfg.vae_warmup, adam_weight_decay=0.0), vae_run)
        del images
        record("vae", r.seconds)

    # 3. latents of every train image, and the scaling factor
    base_init = out / "base-init"
    latents_path = out / LATENTS_FILE
    if not latents_path.is_file() or not (base_init / "model_index.json").is_file():
        from diffusers import AutoencoderKL

        t0 = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(vae_run / "vae", local_files_only=True, use_safetensors=True).eval()
        vae.requires_grad_(False)
        rend = cache_latents(rend_folder, vae, 1.0, progress=cfg.progress, desc="latents rendered")
        real = cache_latents(real_folder, vae, 1.0, progress=cfg.progress, desc="latents real")
        params = torch.cat([rend.params, real.params])
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        gen = torch.Generator().manual_seed(cfg.seed)
        sample = DiagonalGaussianDistribution(params).sample(gen)
        scaling = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=scaling)
        save_model_with(init, {"vae": vae}, base_init)
        meta = {"rendered": len(rend_folder), "real": len(real_folder), "scaling_factor": scaling,
                "captions": [*rend_folder.captions, *real_folder.captions]}
        _save_latents(latents_path, params, meta)
        record("latents", time.perf_counter() - t0)
    params, meta = _load_latents(latents_path)
    n_rend = int(meta["rendered"])
    rows_rend, rows_real = list(range(n_rend)), list(range(n_rend, params.shape[0]))
    captions = meta["captions"]

    timesteps = TimestepSampler(1000, cfg.timestep_bias_portion, 0, cfg.timestep_bias_end)

    def _fit(crop: int | None) -> int | None:  # a crop no smaller than the latents is no crop
        return crop if crop is not None and crop < min(params.shape[-2:]) else None

    def unet_stage(model: Path, run: Path, rows: list[int], name: str, crop: int | None,
                   item_captions: list[str | list[str]], **loop: Any) -> Path:
        model_out = run / MODEL_SUBDIR
        if (model_out / "model_index.json").is_file():
            return model_out
        comps = load_components(model)
        source = CachedLatents(params, comps.scaling_factor).subset(rows, _fit(crop))
        text = CaptionEncoder(comps.tokenizer, comps.text_encoder, cache=True)
        dropout = loop.pop("caption_dropout")
        task = UNetTask(comps, source, [item_captions[i] for i in rows], text, timesteps, dropout,
                        fingerprint={"model": str(model.resolve()), "rows": [rows[0], rows[-1], len(rows)],
                                     "crop": crop}, name=name)
        r: LoopResult = run_training(task, _loop(cfg, **loop), run)
        record(name, r.seconds)
        return model_out

    # 4. the base model: both domains; captions name the domain part of the time, as the web captions
    #    of SD's pretraining do ("3d render", "photo"), so the base model knows the two domains in text
    #    the way SD does; 10% empty captions teach the null text
    domain_captions: list[str | list[str]] = []
    for i, cap in enumerate(captions):
        phrase = DOMAIN_PHRASES["rendered" if i < n_rend else "real"]
        k = round(cfg.domain_caption_portion * 10)
        domain_captions.append([cap] * (10 - k) + [f"{cap}, {phrase}"] * k)
    base = unet_stage(base_init, out / "unet", rows_rend + rows_real, "pretrain-unet", cfg.unet_latent_crop,
                      domain_captions, batch_size=cfg.unet_batch_size, lr=cfg.unet_lr, max_steps=cfg.unet_steps,
                      lr_warmup_steps=cfg.unet_warmup, ema=True, ema_decay=cfg.unet_ema_decay,
                      caption_dropout=cfg.caption_dropout)
    # 5. DKI target domain (eq. 6): real images only, with the dataset's own captions
    finetuned = unet_stage(base, out / "finetune", rows_real, "finetune", cfg.finetune_latent_crop, list(captions),
                           batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr, max_steps=cfg.finetune_steps,
                           caption_dropout=cfg.finetune_caption_dropout)

    # 6/7. DKI source domain: the negative embedding on renders (and the base model's, for the ablation)
    def embedding_stage(model: Path, run: Path, name: str) -> Path:
        final = run / EMBEDDING_FILE
        if final.is_file():
            return final
        comps = load_components(model)
        source = CachedLatents(params, comps.scaling_factor).subset(rows_rend, _fit(cfg.embedding_latent_crop))
        ecfg = EmbeddingConfig(model, Path(cfg.data) / "train" / "rendered", run,
                               _loop(cfg, batch_size=cfg.embedding_batch_size, lr=cfg.embedding_lr,
                                     max_steps=cfg.embedding_steps, adam_weight_decay=0.0),
                               token=cfg.token, num_vectors=cfg.num_vectors,
                               timestep_bias_portion=cfg.timestep_bias_portion, timestep_bias_end=cfg.timestep_bias_end)
        r = train_negative_embedding(ecfg, components=comps, latents=source)
        record(name, r.seconds)
        return final

    embedding = embedding_stage(finetuned, out / "embedding", "negative-embedding")
    if cfg.ablation:
        embedding_stage(base, out / "base-embedding", "base-negative-embedding")

    # 8. the shipped default
    embedded = out / "embedded"
    with atomic_dir(embedded) as tmp:
        shutil.copytree(finetuned, tmp, dirs_exist_ok=True)
        shutil.copy2(embedding, tmp / EMBEDDING_FILE)
        _drop_source_paths(tmp)
        prov = {
            "command": f"r2r-train pretrain-tiny --data DATA --out OUT --seed {cfg.seed} --threads {cfg.threads}",
            "config": cfg.as_json(),
            "dataset": json.loads((Path(cfg.data) / "dataset.json").read_text()),
            "stage_seconds": times,
            "total_training_seconds": round(sum(times.values()), 1),
            "threads": torch.get_num_threads(),
            "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__},
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
        (tmp / MODEL_CARD_FILE).write_text(model_card(prov), encoding="utf-8")
    if cfg.install is not None:
        with atomic_dir(Path(cfg.install)) as tmp:
            shutil.copytree(embedded, tmp, dirs_exist_ok=True)
        return Path(cfg.install)
    return embedded
