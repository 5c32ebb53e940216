"""The procedural render/real garment dataset (`r2r.training.data`, `r2r-train data`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r.training import data
from r2r.training.cli import main

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ LUMA


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pair(index: int, size: tuple[int, int], seed: int = 0) -> tuple[data.Design, np.ndarray, np.ndarray]:
    design = data.sample_design(np.random.default_rng([seed, index]), size)
    rendered, real = data.render_pair(design, size)
    return design, rendered, real


def _interior(rendered: np.ndarray, erode: int = 2) -> np.ndarray:
    """Garment pixels (non-white in the render) at least `erode` px away from the silhouette."""
    mask = (rendered != 255).any(axis=-1)
    inner = mask.copy()
    for axis in (0, 1):
        for shift in range(1, erode + 1):
            inner &= np.roll(mask, shift, axis) & np.roll(mask, -shift, axis)
    return inner


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_layout_lists_every_image_once_with_a_caption_from_the_vocabulary(tmp_path: Path) -> None:
    out = data.generate_dataset(tmp_path / "ds", count=10, size=(64, 64), seed=3, progress=False)
    vocabulary = set(data.CAPTION_WORDS)
    for split in data.SPLITS:
        for domain in data.DOMAINS:
            folder = out / split / domain
            rows = _read_jsonl(folder / "metadata.jsonl")
            names = [r["file_name"] for r in rows]
            assert len(names) == len(set(names))
            assert sorted(names) == sorted(p.name for p in folder.glob("*.png"))
            for row in rows:
                assert set(row) == {"file_name", "text"}
                assert row["text"].strip()
                assert set(row["text"].split()) <= vocabulary, row["text"]
    assert sorted((out / "train" / "rendered").glob("*.png"))[0].name == "000000.png"
    info = json.loads((out / "dataset.json").read_text())
    assert info["count"] == 10 and info["size"] == [64, 64] and info["seed"] == 3
    assert info["test_fraction"] == 0.1 and info["generator_version"] == data.GENERATOR_VERSION


def test_captions_name_colours_pattern_and_garment_but_not_the_domain() -> None:
    domain_words = {"rendered", "render", "real", "photo", "cgi"}
    for i in range(200):
        design = data.sample_design(np.random.default_rng([0, i]), (256, 256))
        caption = data.caption_for(design)
        words = caption.split()
        assert caption == " ".join(words) and caption == caption.lower()
        assert set(words) <= set(data.CAPTION_WORDS), caption
        assert not set(words) & domain_words
        assert all(color in words for color in design.pattern.colors), caption
        assert data.GARMENTS[design.garment.kind] in caption
    assert data.caption_for(design) == data.caption_for(design)  # a pure function of the design


def test_same_arguments_give_byte_identical_datasets(tmp_path: Path) -> None:
    a = data.generate_dataset(tmp_path / "a", count=5, size=(64, 64), seed=7, progress=False)
    b = data.generate_dataset(tmp_path / "b", count=5, size=(64, 64), seed=7, progress=False)
    assert _files(a) == _files(b)


def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    one = data.generate_dataset(tmp_path / "one", count=6, size=(64, 64), seed=1, progress=False)
    two = data.generate_dataset(tmp_path / "two", count=6, size=(64, 64), seed=1, workers=2, progress=False)
    assert _files(one) == _files(two)


def test_a_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = data.generate_dataset(tmp_path / "a", count=3, size=(64, 64), seed=0, progress=False)
    b = data.generate_dataset(tmp_path / "b", count=3, size=(64, 64), seed=1, progress=False)
    for domain in data.DOMAINS:
        for name in ("000000.png", "000001.png"):
            assert (a / "train" / domain / name).read_bytes() != (b / "train" / domain / name).read_bytes()


def test_image_i_does_not_depend_on_the_dataset_count(tmp_path: Path) -> None:
    small = data.generate_dataset(tmp_path / "small", count=3, size=(64, 64), seed=5, test_fraction=0.0,
                                  progress=False)  # fmt: skip
    big = data.generate_dataset(tmp_path / "big", count=8, size=(64, 64), seed=5, test_fraction=0.0, progress=False)
    for domain in data.DOMAINS:
        for i in range(3):
            name = f"{i:06d}.png"
            assert (small / "train" / domain / name).read_bytes() == (big / "train" / domain / name).read_bytes()


def test_the_last_designs_form_a_test_split_pairing_same_named_render_and_real(tmp_path: Path) -> None:
    out = data.generate_dataset(tmp_path / "ds", count=12, size=(64, 64), seed=0, test_fraction=0.25,
                                progress=False)  # fmt: skip
    test_r = sorted(p.name for p in (out / "test" / "rendered").glob("*.png"))
    test_q = sorted(p.name for p in (out / "test" / "real").glob("*.png"))
    assert test_r == test_q == [f"{i:06d}.png" for i in range(9, 12)]
    assert _read_jsonl(out / "test" / "rendered" / "metadata.jsonl") == _read_jsonl(
        out / "test" / "real" / "metadata.jsonl"
    )
    train = sorted(p.name for p in (out / "train" / "rendered").glob("*.png"))
    assert train == sorted(p.name for p in (out / "train" / "real").glob("*.png"))
    assert not set(train) & set(test_r)


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [(200, 0.1, (180, 20)), (2, 0.1, (1, 1)), (1, 0.1, (1, 0)), (10, 0.0, (10, 0)), (4, 0.9, (1, 3))],
)
def test_split_sizes_keep_at_least_one_test_and_one_train_design(
    count: int, fraction: float, expected: tuple[int, int]
) -> None:
    assert data.split_counts(count, fraction) == expected


def test_non_square_size_gives_height_by_width_images(tmp_path: Path) -> None:
    _, rendered, real = _pair(0, (128, 96))
    assert rendered.shape == real.shape == (96, 128, 3)
    assert rendered.dtype == real.dtype == np.uint8
    out = data.generate_dataset(tmp_path / "ds", count=2, size=(128, 96), seed=0, progress=False)
    with Image.open(out / "train" / "real" / "000000.png") as im:
        assert im.size == (128, 96) and im.mode == "RGB"


def test_render_is_flat_with_few_colours_while_real_is_noisy_with_many() -> None:
    for i in range(8):
        _, rendered, real = _pair(i, (128, 96))
        inner = _interior(rendered)
        assert inner.sum() > 500
        flat = len(np.unique(rendered[inner], axis=0))
        noisy = len(np.unique(real[inner], axis=0))
        assert flat <= 40, (i, flat)
        assert noisy >= 150, (i, noisy)
        assert (rendered[~(rendered != 255).any(-1)] == 255).all()  # pure white background


def test_real_stays_aligned_with_its_render_but_is_not_a_copy() -> None:
    for i in range(8):
        design, rendered, real = _pair(i, (128, 96))
        g_r, g_q = _gray(rendered).ravel(), _gray(real).ravel()
        assert np.corrcoef(g_r, g_q)[0, 1] > 0.75, i
        inner = _interior(rendered)
        assert np.abs(g_r - g_q)[inner.ravel()].mean() > 3.0, i  # shading, folds and grading on the garment
        # the fold displacement is bounded to a few pixels at 256x256
        assert design.photo.fold_displacement * 256 <= 3.0


def test_real_background_has_a_drop_shadow_and_lighting_is_not_uniform() -> None:
    _, rendered, real = _pair(2, (128, 128))
    background = ~(rendered != 255).any(-1)
    far = background.copy()
    for shift in range(1, 13):
        for axis in (0, 1):
            far &= np.roll(background, shift, axis) & np.roll(background, -shift, axis)
    near = background & ~far
    assert _gray(real)[near].mean() < _gray(real)[far].mean() - 2.0  # darker next to the garment


def test_real_backdrop_away_from_the_garment_stays_white_so_the_gap_is_on_the_garment() -> None:
    for i in range(12):
        _, rendered, real = _pair(i, (128, 128))
        background = ~(rendered != 255).any(-1)
        far = background.copy()
        for shift in range(1, 13):
            for axis in (0, 1):
                far &= np.roll(background, shift, axis) & np.roll(background, -shift, axis)
        assert far.sum() > 500
        assert (real[far].reshape(-1, 3).mean(axis=0) >= 225).all(), i


def test_patterned_designs_have_fine_high_frequency_texture() -> None:
    energies = []
    for i in range(30):
        design, rendered, _ = _pair(i, (128, 128))
        if design.pattern.kind == "solid":
            continue
        g = _gray(rendered)
        high = g - 0.25 * (np.roll(g, 1, 0) + np.roll(g, -1, 0) + np.roll(g, 1, 1) + np.roll(g, -1, 1))
        energy = float(np.abs(high[_interior(rendered)]).mean())
        assert energy > 2.5, (i, design.pattern.kind, energy)
        assert 8.0 - 1e-9 <= design.pattern.period * 256 <= 24.0 + 1e-9  # one to three latent cells
        energies.append(energy)
    assert len(energies) >= 20 and float(np.median(energies)) > 8.0


def test_garments_cover_a_sizeable_centred_part_of_the_image() -> None:
    for i in range(30):
        _, rendered, _ = _pair(i, (128, 128))
        mask = (rendered != 255).any(-1)
        assert 0.2 <= mask.mean() <= 0.75, (i, mask.mean())
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_cli_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    runner = CliRunner()
    args = ["data", "--out", str(out), "--count", "2", "--size", "64x64", "--seed", "0"]
    assert runner.invoke(main, args).exit_code == 0
    first = _files(out)
    refused = runner.invoke(main, [*args[:-1], "1"])
    assert refused.exit_code == 2
    assert "not empty" in refused.output and "--overwrite" in refused.output
    assert _files(out) == first
    replaced = runner.invoke(main, [*args[:-1], "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert _files(out) != first
    assert json.loads((out / "dataset.json").read_text())["seed"] == 1


def test_overwrite_never_deletes_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["data", "--out", str(out), "--count", "2", "--size", "64x64", "--overwrite"])
    assert result.exit_code == 2 and "dataset.json" in result.output
    assert (out / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".precious.tmp-*"))


@pytest.mark.parametrize("bad", ["256", "256x", "axb", "250x256", "16x16", "8192x256", "256x256x3"])
def test_cli_bad_size_error_names_the_value(tmp_path: Path, bad: str) -> None:
    result = CliRunner().invoke(main, ["data", "--out", str(tmp_path / "ds"), "--count", "1", "--size", bad])
    assert result.exit_code == 2
    assert repr(bad) in result.output and "256x256" in result.output
    assert not (tmp_path / "ds").exists()


def test_parse_size_returns_width_then_height() -> None:
    assert data.parse_size("128x96") == (128, 96)
    assert data.parse_size(" 32X4096 ") == (32, 4096)


def test_no_partial_folder_is_left_after_success(tmp_path: Path) -> None:
    out = data.generate_dataset(tmp_path / "ds", count=2, size=(64, 64), seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert (out / "dataset.json").is_file()


def test_a_failed_run_leaves_neither_a_dataset_nor_a_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = data.render_pair
    calls = []

    def flaky(design: data.Design, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_render(design, size)

    monkeypatch.setattr("r2r.training.data.writer.render_pair", flaky)  # the writer's own binding
    with pytest.raises(RuntimeError, match="disk on fire"):
        data.generate_dataset(tmp_path / "ds", count=5, size=(64, 64), seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []
