"""Evaluation metrics (SSIM, PSNR, the realism classifier) and the ablation report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2r.metrics import gaussian_window, psnr, ssim
from r2r.training.evaluate import train_realism_classifier


def test_ssim_of_an_image_with_itself_is_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x[..., 0], x[..., 0]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_has_its_closed_form() -> None:
    # no variance: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-9)


def test_ssim_drops_with_noise_and_blur_and_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    stripes = np.tile(((np.arange(64) // 3) % 2 * 200 + 20).astype(np.uint8), (64, 1))
    noisy = np.clip(stripes + rng.normal(0, 25, stripes.shape), 0, 255).astype(np.uint8)
    flat = np.full_like(stripes, int(stripes.mean()))
    assert 0 < ssim(stripes, noisy) < 0.99
    assert ssim(stripes, flat) < ssim(stripes, noisy)
    assert ssim(stripes, noisy) == pytest.approx(ssim(noisy, stripes), abs=1e-12)
    assert gaussian_window().sum() == pytest.approx(1.0)


def test_psnr_known_values() -> None:
    a = np.full((8, 8, 3), 10, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1: 48.13 dB
    assert psnr(np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)) == pytest.approx(0.0)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0, 0, 0] = 20  # one error of 10 among 192 values: MSE 100 / 192
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 192 / 100), abs=1e-9)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "ds", 60, (64, 64), seed=2, test_fraction=0.3,
                            progress=False)


def test_the_realism_classifier_beats_chance_on_held_out_images(data_dir: Path) -> None:
    from r2r.imageio import load_rgb

    def read(split: str, domain: str) -> list[np.ndarray]:
        return [load_rgb(p) for p in sorted((data_dir / split / domain).glob("*.png"))]

    clf = train_realism_classifier(read("train", "rendered"), read("train", "real"), steps=600, seed=0,
                                   progress=False)
    p_rend, p_real = clf.prob_real(read("test", "rendered")), clf.prob_real(read("test", "real"))
    accuracy = (np.sum(p_rend <= 0.5) + np.sum(p_real > 0.5)) / (len(p_rend) + len(p_real))
    assert len(p_rend) == 18 and accuracy >= 0.75, (p_rend, p_real)


def _evaluate(model: Path, data: Path, out: Path, limit: int, steps: int, *extra: str) -> None:
    """`r2r-train evaluate` with the model as its own base, few steps; it must succeed."""
    from click.testing import CliRunner

    from r2r.training.cli import main

    emb = model / "negative_embedding.safetensors"
    args = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--base-model", str(model),
            "--base-embedding", str(emb), "--limit", str(limit), "--steps", str(steps), "--strength", "0.5",
            "--classifier-steps", "5", "--no-progress", *extra]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_evaluate_writes_the_ablation_report(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    _evaluate(tiny_model_dir, data_dir, out, 2, 4, "--caption-guidance", "3")
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["render (input)", "VAE round trip", "full", "w/o TAC", "w/o negative embedding",
                     "caption, w_t 3", "w/o finetune", "real (ground truth)"]
    # the caption row: each render's own caption as its prompt, and it moves the output
    meta = [json.loads(line) for line in (data_dir / "test" / "rendered" / "metadata.jsonl").read_text().splitlines()]
    assert len(report["captions"]) == 2 and set(report["captions"]) <= {row["text"] for row in meta}
    full, captioned = (sorted((out / "images" / d).glob("*.png")) for d in ("full", "caption,_w_t_3"))
    assert any(np.asarray(Image.open(a)).tobytes() != np.asarray(Image.open(b)).tobytes()
               for a, b in zip(full, captioned, strict=True))
    assert (out / "prompt-grid.png").is_file() and "prompts" in report["grids"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["render (input)"]["ssim_input"] == pytest.approx(1.0)
    assert rows["real (ground truth)"]["ssim_gt"] == pytest.approx(1.0)
    assert report["images"] == 2 and report["method"]["steps"] == 4
    assert 0.0 <= report["classifier"]["test_accuracy"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| full |" in md and "| w/o TAC |" in md and "held-out accuracy" in md
    assert (out / "before-after.png").is_file() and (out / "ablation-grid.png").is_file()
    assert len(list((out / "images" / "full").glob("*.png"))) == 2
    assert set(report["separation"]) == {"DKI model", "base model (w/o finetune)"}
    assert "DKI separation" in md and "| DKI model |" in md


def test_evaluate_translates_a_test_split_of_mixed_sizes_each_at_its_own_size(
        tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """Pairs of different sizes (one off the pixel multiple: padded and restored) are evaluated together; every
    output has its render's size and every metric compares like with like."""
    import shutil

    from PIL import Image

    data = tmp_path / "mixed"
    shutil.copytree(data_dir, data)
    names = sorted(p.name for p in (data / "test" / "rendered").glob("*.png"))[:3]
    sizes = {names[0]: (96, 64), names[1]: (80, 112)}  # names[2] keeps 64x64
    for name, size in sizes.items():
        for domain in ("rendered", "real"):
            path = data / "test" / domain / name
            Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(path)
    out = tmp_path / "eval"
    _evaluate(tiny_model_dir, data, out, limit=3, steps=2)
    for row in ("full", "wo_TAC", "VAE_round_trip"):
        got = {p.name: Image.open(p).size for p in (out / "images" / row).glob("*.png")}
        assert got == {**{n: (64, 64) for n in names}, **sizes}, (row, got)
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3 and all(0.0 < r["ssim_input"] <= 1.0 + 1e-9 for r in report["rows"])


def _test_pairs(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fresh procedural pairs (a seed the shipped default never trained on): renders, real twins."""
    from r2r.tiny import DEFAULT_RESOLUTION
    from r2r.training.data import render_pair, sample_design

    rng = np.random.default_rng(11)
    pairs = [render_pair(sample_design(rng, DEFAULT_RESOLUTION), DEFAULT_RESOLUTION) for _ in range(count)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_dki_separation_gives_both_domains_the_same_noise(tiny_model_dir: Path) -> None:
    from r2r.config import Method
    from r2r.models import load_components
    from r2r.reference import ReferencePipeline
    from r2r.training.evaluate import dki_separation

    pipe = ReferencePipeline(load_components(tiny_model_dir), tiny_model_dir / "negative_embedding.safetensors",
                             256, 256)
    images, _ = _test_pairs(3)
    s = dki_separation(pipe, images, images, Method(steps=10), batch_size=2)
    assert s["timesteps"] == [201, 101, 1]  # n = 3 steps of 10 at strength 0.3: first, middle, last
    assert s["rendered"] == s["real"]  # same images, same per-image noise: the domains can only differ by images
    assert all(0 < v < 10 for v in s["rendered"].values())
    other = dki_separation(pipe, images, images, Method(steps=10), batch_size=3, seed=1)
    assert other["rendered"]["null"] != s["rendered"]["null"]


def test_the_shipped_negative_embedding_predicts_renders_better_than_the_null_text() -> None:
    from r2r.config import Method
    from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
    from r2r.reference import ReferencePipeline
    from r2r.training.evaluate import dki_separation

    pipe = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, 256, 256)
    renders, reals = _test_pairs(8)
    s = dki_separation(pipe, renders, reals, Method(), batch_size=8)
    # eq. 7's objective on unseen renders, and eq. 6's on their real twins
    assert s["rendered"]["negative"] < s["rendered"]["null"], s
    assert s["real"]["null"] < s["real"]["negative"], s
