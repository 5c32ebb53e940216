"""`r2r-train evaluate`: the paper's ablation on a paired test split, with numbers a command produces.

Method rows (full, without TAC, without the negative embedding, without the finetune) and reference rows (render,
VAE round trip, real ground truth), scored by SSIM / PSNR against the real twin, SSIM against the render, and a
seeded real-vs-rendered classifier's realism, its test accuracy reported beside.
Why: docs/design.md, "Evaluation".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from r2r.config import Method
from r2r.imageio import load_rgb, save_png
from r2r.metrics import psnr, ssim
from r2r.schedule import forward_noise
from r2r.sizing import MAX_SIDE, SizeRange, place, prepare, restore
from r2r.training.finetune import ImageFolder, by_size, images_to_tensor

if TYPE_CHECKING:
    from torch import nn

    from r2r.reference import ReferencePipeline

__all__ = [
    "EvalConfig",
    "RealismClassifier",
    "dki_separation",
    "evaluate",
    "train_realism_classifier",
]


# --------------------------------------------------------------------------------------------------
# Realism classifier
# --------------------------------------------------------------------------------------------------

CLASSIFIER_CROP = 64  # training crops (full resolution: noise and blur stay visible); scoring sees whole images


def _make_classifier() -> nn.Module:
    from torch import nn

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(4, o), nn.SiLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


@dataclass
class RealismClassifier:
    """A small fully convolutional real-vs-rendered CNN (logit > 0: real) and its held-out accuracy."""

    net: Any
    test_accuracy: float | None = None
    test_accuracy_real: float | None = None
    test_accuracy_rendered: float | None = None
    steps: int = 0

    def prob_real(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        import torch

        self.net.eval()
        out = np.zeros(len(images))
        with torch.no_grad():
            for group in by_size(range(len(images)), lambda i: images[i].shape):  # batches of one size
                for k in range(0, len(group), batch_size):
                    part = group[k : k + batch_size]
                    x = images_to_tensor([images[i] for i in part])
                    out[part] = torch.sigmoid(self.net(x)).squeeze(1).numpy()
        return out


def train_realism_classifier(rendered: Sequence[np.ndarray], real: Sequence[np.ndarray], steps: int = 300,
                             batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                             progress: bool = True) -> RealismClassifier:
    """Train on random full-resolution crops of rendered (label 0) and real (label 1) images, seeded order
    and crops, random flips; the network pools globally, so it then scores whole images."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    x = [torch.from_numpy(im) for im in (*rendered, *real)]  # uint8 [H, W, 3] each, of any size
    y = torch.cat([torch.zeros(len(rendered)), torch.ones(len(real))])
    hs, ws = torch.tensor([t.shape[0] for t in x]), torch.tensor([t.shape[1] for t in x])
    h, w = int(hs.min()), int(ws.min())
    one_size = bool((hs == h).all() and (ws == w).all())
    c = min(CLASSIFIER_CROP, h, w)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _make_classifier()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    bar = tqdm(range(steps), desc="realism classifier", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        if one_size:
            ys = torch.randint(0, h - c + 1, (batch_size,), generator=gen).tolist()
            xs = torch.randint(0, w - c + 1, (batch_size,), generator=gen).tolist()
        else:  # each crop inside its own image
            ys = (torch.rand(batch_size, generator=gen) * (hs[idx] - c + 1)).long().tolist()
            xs = (torch.rand(batch_size, generator=gen) * (ws[idx] - c + 1)).long().tolist()
        crops = torch.stack([x[i][a : a + c, b : b + c] for i, a, b in zip(idx.tolist(), ys, xs, strict=True)])
        xb = crops.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.binary_cross_entropy_with_logits(net(xb).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return RealismClassifier(net, steps=steps)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """`r2r-train evaluate`: the model + embedding under test, the dataset, and the ablation's base model."""

    model: Path
    embedding: Path
    data: Path
    out: Path
    base_model: Path | None = None  # the pre-DKI model, for the "without finetune" row
    base_embedding: Path | None = None  # its own negative embedding
    limit: int | None = None
    method: Method = field(default_factory=Method)
    batch_size: int = 8
    classifier_steps: int = 300
    seed: int = 0
    grid_rows: int = 6
    progress: bool = True
    text_guidance: tuple[float, ...] = ()  # rows with the test split's captions as prompts, one per w_t


@dataclass
class Row:
    name: str
    description: str
    outputs: list[np.ndarray]
    seconds: float = 0.0


def _pair_folders(data: Path, split: str) -> tuple[ImageFolder, ImageFolder]:
    from r2r.training.finetune import DataError

    folders = []
    for domain in ("rendered", "real"):
        path = Path(data) / split / domain
        if not (path / "metadata.jsonl").is_file():
            raise DataError(f"{path}/metadata.jsonl: missing; --data must be a dataset made by `r2r-train data`")
        folders.append(path)
    rend = ImageFolder.open(folders[0], 8)
    real = ImageFolder.open(folders[1], 8)
    if rend.files != real.files:
        raise DataError(f"{folders[0]} and {folders[1]} list different files; the test split must be paired")
    return rend, real


def _read(folder: ImageFolder, limit: int | None) -> list[np.ndarray]:
    """The folder's images at their own sizes."""
    names = folder.files[:limit] if limit else folder.files
    return [load_rgb(folder.folder / n) for n in names]


def _size_range(model: Path, native: tuple[int, int]) -> SizeRange:
    """The sizes the reference takes for `model` (any multiple of its pixel multiple), its native size the budget."""
    from r2r.tac import pixel_multiple

    m = pixel_multiple(json.loads((Path(model) / "unet" / "config.json").read_text()))
    return SizeRange(m, (2 * m, 2 * m), (MAX_SIDE, MAX_SIDE), native)


def _groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    return by_size(range(len(images)), lambda i: images[i].shape)


def _pipeline(model: Path, embedding: Path, size: tuple[int, int]) -> ReferencePipeline:
    """The reference pipeline of `model` for images of `size` = (W, H)."""
    from r2r.models import load_components
    from r2r.reference import ReferencePipeline

    return ReferencePipeline(load_components(model), embedding, size[0], size[1])


def _translate(pipe: ReferencePipeline, images: list[np.ndarray], methods: dict[str, Method],
               batch_size: int, progress: bool, prompts: dict[str, list[str]] | None = None
               ) -> dict[str, tuple[list[np.ndarray], float]]:
    """Translate `images` once per method config with one loaded pipeline (`prompts`: a row's, one per image)."""
    from tqdm import tqdm

    results = {}
    batches = [g[k : k + batch_size] for g in _groups(images) for k in range(0, len(g), batch_size)]
    for name, method in methods.items():
        t0 = time.perf_counter()
        outs: list[np.ndarray] = [np.zeros(0, np.uint8)] * len(images)
        for batch in tqdm(batches, desc=name, unit="batch", disable=not progress):
            h, w = images[batch[0]].shape[:2]
            pipe.set_size(w, h)
            given = (prompts or {}).get(name)
            texts = None if given is None else [given[i] for i in batch]
            for i, out in zip(batch, pipe([images[i] for i in batch], method, prompts=texts), strict=True):
                outs[i] = out
        results[name] = (outs, time.perf_counter() - t0)
    return results


def dki_separation(pipe: ReferencePipeline, renders: Sequence[np.ndarray], reals: Sequence[np.ndarray],
                   method: Method, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Eqs. 6 and 7's noise-prediction MSE on held-out images, per domain and conditioning.

    The guidance e = e_neg + w (e_null - e_neg) moves an image only by what the two conditionings
    disagree on, so this is what DKI must achieve for the method to translate: the negative embedding
    predicts the noise of renders better than the null text (eq. 7's objective) and the null text that
    of real photos better (eq. 6's). Measured at the generation's first, middle and last timestep;
    image i of either domain gets the same seeded noise, so the domains differ only by their images.
    """
    import torch

    sched = pipe.schedule(method)
    picks = sorted({0, sched.n // 2, sched.n - 1})
    timesteps = [sched.timesteps[i] for i in picks]
    alphas = [sched.alpha[i] for i in picks]
    conds = {"null": pipe.c_null, "negative": pipe.c_neg}
    result: dict[str, Any] = {"timesteps": timesteps}
    with torch.no_grad():
        for domain, images in (("rendered", renders), ("real", reals)):
            sums = dict.fromkeys(conds, 0.0)
            count = 0
            for batch in [g[k : k + batch_size] for g in _groups(images) for k in range(0, len(g), batch_size)]:
                h, w = images[batch[0]].shape[:2]
                pipe.set_size(w, h)
                z0 = pipe.encode([images[i] for i in batch])
                noise = torch.stack([  # image i's noise, whatever the batch size
                    torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(seed * 100_003 + i))
                    for i in batch
                ]).to(z0.device, z0.dtype)
                for t, a in zip(timesteps, alphas, strict=True):
                    zt = forward_noise(z0, noise, a)
                    for name, cond in conds.items():
                        eps = pipe.c.unet(zt, t, encoder_hidden_states=cond.expand(z0.shape[0], -1, -1)).sample
                        sums[name] += float(((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3)).sum())
                count += z0.shape[0] * len(timesteps)
            result[domain] = {name: v / count for name, v in sums.items()}
    return result


def _vae_roundtrip(model: Path, images: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    import torch

    from r2r.models import load_components

    c = load_components(model)
    outs: list[np.ndarray] = [np.zeros(0, np.uint8)] * len(images)
    with torch.no_grad():
        for batch in [g[k : k + batch_size] for g in _groups(images) for k in range(0, len(g), batch_size)]:
            x = images_to_tensor([images[i] for i in batch])
            z = c.vae.encode(x).latent_dist.mean
            y = c.vae.decode(z).sample
            u8 = (y / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            for i, im in zip(batch, u8, strict=True):
                outs[i] = im.permute(1, 2, 0).numpy()
    return outs


def _grid(columns: list[list[np.ndarray]], rows: int, pad: int = 4) -> np.ndarray:
    """Images side by side (one column per list), `rows` rows, white gutters; cells at the first image's size."""
    from PIL import Image

    h, w = columns[0][0].shape[:2]
    n = min(rows, len(columns[0]))
    columns = [[im if im.shape[:2] == (h, w) else np.asarray(Image.fromarray(im).resize((w, h))) for im in col]
               for col in columns]
    grid = np.full((n * h + (n + 1) * pad, len(columns) * w + (len(columns) + 1) * pad, 3), 255, np.uint8)
    for r in range(n):
        for c, col in enumerate(columns):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = col[r]
    return grid


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


def _separation_markdown(separation: dict[str, dict[str, Any]]) -> list[str]:
    ts = next(iter(separation.values()))["timesteps"]
    lines = [
        "DKI separation: noise-prediction MSE on the same test images, at t = "
        + " / ".join(str(t) for t in ts) + " (lower is better; change of the negative embedding vs the null text).",
        "",
        "| model | renders, null text | renders, negative embedding | real, null text | real, negative embedding |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in separation.items():
        cells = []
        for domain in ("rendered", "real"):
            null, neg = s[domain]["null"], s[domain]["negative"]
            cells += [f"{null:.4f}", f"{neg:.4f} ({100 * (neg / null - 1):+.1f}%)"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The guidance moves an image only by what the two conditionings disagree on: DKI has separated "
              "the domains when the negative embedding is the better predictor on renders and the null text on "
              "real photos."]
    return lines


def _markdown(report: dict[str, Any]) -> str:
    c = report["classifier"]
    lines = [
        f"Test split: {report['images']} paired render/real images of {report['data']} "
        f"({report['resolution'][0]}x{report['resolution'][1]}); method: steps {report['method']['steps']}, "
        f"strength {report['method']['strength']}, guidance {report['method']['guidance']}, "
        f"TAC ratio {report['method']['tac_ratio']}, attention pool {report['method'].get('attention_pool') or 1}, "
        f"step-cache interval {report['method'].get('cache_interval') or 1}.",
        "",
        "| row | SSIM vs real GT ↑ | PSNR vs real GT (dB) ↑ | SSIM vs input render ↑ | realism (classified real) ↑ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {_fmt(r['ssim_gt'])} | {_fmt(r['psnr_gt'], 2)} | {_fmt(r['ssim_input'])} | "
                     f"{_fmt(r['realism'], 2)} |")
    lines += [
        "",
        f"Realism classifier: small CNN trained {c['steps']} steps on {c['crop']}px crops of the train split "
        "(real vs rendered, seeded), scoring whole images; "
        f"held-out accuracy on the test split {c['test_accuracy']:.3f} (real {c['test_accuracy_real']:.3f}, "
        f"rendered {c['test_accuracy_rendered']:.3f}).",
        "SSIM: Gaussian window 11 / sigma 1.5, per RGB channel, mean of channels; PSNR over RGB, 8-bit range.",
        "",
        *_separation_markdown(report["separation"]),
        "",
        "Rows: " + "; ".join(f"**{r['name']}**: {r['description']}" for r in report["rows"]) + ".",
    ]
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score every row on the test split; writes OUT/report.json, OUT/report.md, grids and the outputs."""
    from r2r.models import default_resolution, model_defaults

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    size = default_resolution(cfg.model)
    test_r, test_q = _pair_folders(cfg.data, "test")
    renders = _read(test_r, cfg.limit)
    reals = _read(test_q, cfg.limit)
    names = list(test_r.files[: len(renders)])
    # every image at its own size: the reference runs it where r2r-run would (r2r/sizing.py), outputs come back at
    # the input's size
    sizes = _size_range(cfg.model, size)
    placed = [place(im.shape[1], im.shape[0], sizes) for im in renders]
    runs = [prepare(im, p) for im, p in zip(renders, placed, strict=True)]
    runs_real = [prepare(im, place(im.shape[1], im.shape[0], sizes)) for im in reals]

    def back(outs: list[np.ndarray]) -> list[np.ndarray]:
        return [restore(o, p) for o, p in zip(outs, placed, strict=True)]

    # classifier: trained on the train split, judged on the whole test split
    train_r, train_q = _pair_folders(cfg.data, "train")
    t0 = time.perf_counter()
    clf = train_realism_classifier(_read(train_r, None), _read(train_q, None), cfg.classifier_steps,
                                   seed=cfg.seed, progress=cfg.progress)
    all_r, all_q = _read(test_r, None), _read(test_q, None)
    pr, pq = clf.prob_real(all_r), clf.prob_real(all_q)
    clf.test_accuracy_rendered = float(np.mean(pr <= 0.5))
    clf.test_accuracy_real = float(np.mean(pq > 0.5))
    clf.test_accuracy = float((np.sum(pr <= 0.5) + np.sum(pq > 0.5)) / (len(pr) + len(pq)))
    classifier_seconds = time.perf_counter() - t0

    # what r2r-run does with the same flags: what is not given, the model's defaults (its step-cache interval)
    m = cfg.method.complete(cfg.method.divisor, cfg.method.pool, model_defaults(cfg.model).cache_interval)
    rows = [Row("render (input)", "the input render, untranslated", renders),
            Row("VAE round trip", "decode(encode(render)) with the model's VAE, no diffusion",
                back(_vae_roundtrip(cfg.model, runs, cfg.batch_size)))]
    methods = {
        "full": (m, "the method at its defaults (DKI model + negative embedding, TAC"
                    + (f"; step caching K = {m.interval}" if m.interval > 1 else "") + ")"),
        "w/o TAC": (replace(m, tac_ratio=0.0), "tac_ratio 0"),
        "w/o negative embedding": (replace(m, guidance=1.0), "null text only (guidance 1: e = e_null)"),
    }
    captions = list(test_r.captions[: len(renders)])
    for w in cfg.text_guidance:  # the two-term guidance with each render's caption (docs/design.md, "Prompts")
        methods[f"caption, w_t {w:g}"] = (replace(m, text_guidance=w),
                                          f"the test split's caption as the prompt, text guidance {w:g}")
    prompts = {name: captions for name in methods if name.startswith("caption")}
    pipe = _pipeline(cfg.model, cfg.embedding, size)
    done = _translate(pipe, runs, {k: v[0] for k, v in methods.items()}, cfg.batch_size, cfg.progress, prompts)
    separation = {"DKI model": dki_separation(pipe, runs, runs_real, m, cfg.batch_size, cfg.seed)}
    rows += [Row(k, methods[k][1], back(outs), secs) for k, (outs, secs) in done.items()]
    if cfg.base_model is not None:
        base_emb = cfg.base_embedding or Path(cfg.base_model) / "negative_embedding.safetensors"
        base = _pipeline(cfg.base_model, base_emb, size)
        (outs, secs), = _translate(base, runs, {"w/o finetune": m}, cfg.batch_size, cfg.progress).values()
        outs = back(outs)
        separation["base model (w/o finetune)"] = dki_separation(base, runs, runs_real, m, cfg.batch_size, cfg.seed)
        rows.append(Row("w/o finetune", "the pre-DKI base model with its own negative embedding, trained on it",
                        outs, secs))
    rows.append(Row("real (ground truth)", "the photographed twin of each render", reals))

    report_rows = []
    for row in rows:
        probs = clf.prob_real(row.outputs)
        report_rows.append({
            "name": row.name,
            "description": row.description,
            "ssim_gt": float(np.mean([ssim(o, g) for o, g in zip(row.outputs, reals, strict=True)])),
            "psnr_gt": float(np.mean([psnr(o, g) for o, g in zip(row.outputs, reals, strict=True)])),
            "ssim_input": float(np.mean([ssim(o, r) for o, r in zip(row.outputs, renders, strict=True)])),
            "realism": float(np.mean(probs > 0.5)),
            "realism_mean_probability": float(np.mean(probs)),
            "seconds": round(row.seconds, 1),
        })
        folder = out / "images" / row.name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")
        for name, img in zip(names, row.outputs, strict=True):
            save_png(folder / name, img)

    by = {r.name: r.outputs for r in rows}
    save_png(out / "before-after.png", _grid([renders, by["full"], reals], cfg.grid_rows))
    save_png(out / "ablation-grid.png", _grid([r.outputs for r in rows], cfg.grid_rows))
    with_captions = [r.name for r in rows if r.name.startswith("caption")]
    if with_captions:
        save_png(out / "prompt-grid.png", _grid([renders, by["full"], *(by[n] for n in with_captions), reals],
                                                cfg.grid_rows))
    report = {
        "data": str(cfg.data),
        "images": len(renders),
        "resolution": list(size),
        "model": str(cfg.model),
        "embedding": str(cfg.embedding),
        "base_model": str(cfg.base_model) if cfg.base_model else None,
        "base_embedding": str(cfg.base_embedding) if cfg.base_embedding else None,
        "method": asdict(m),
        "classifier": {"steps": clf.steps, "crop": CLASSIFIER_CROP, "test_accuracy": clf.test_accuracy,
                       "test_accuracy_real": clf.test_accuracy_real,
                       "test_accuracy_rendered": clf.test_accuracy_rendered,
                       "seconds": round(classifier_seconds, 1)},
        "rows": report_rows,
        "separation": separation,
        "grids": {"before_after": "before-after.png (render | full | real)",
                  "ablation": "ablation-grid.png (" + " | ".join(r.name for r in rows) + ")",
                  **({"prompts": "prompt-grid.png (render | full | " + " | ".join(with_captions) + " | real)"}
                     if with_captions else {})},
        "captions": captions if with_captions else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report
