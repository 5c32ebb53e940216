"""`r2r-run --backend torch`: one PNG per input, named after it, with the parameters inside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from r2r.runtime.cli import main

from r2r.imageio import read_png_text


def _write_inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for name, mode in (("shirt", "RGB"), ("dress", "RGBA")):
        arr = rng.integers(0, 255, (200, 180, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        p = folder / f"{name}.png"
        Image.fromarray(arr, mode).save(p)
        paths.append(p)
    return paths


def test_run_writes_one_png_per_input_with_parameters(tiny_model_dir: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "in"), "--output", str(out), "--model",
                                    str(tiny_model_dir), "--steps", "10", "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["dress.png", "shirt.png"]
    with Image.open(out / "dress.png") as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    params = json.loads(read_png_text(out / "shirt.png")["r2r:parameters"])
    assert params["steps"] == 10 and params["strength"] == 0.5 and params["tac_divisor"] == 256
    assert params["width"] == 256 and params["source"] == "shirt.png"
    assert "2 written, 0 failed" in res.output


def test_a_broken_input_fails_alone_and_sets_the_exit_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "in"), "--output", str(out), "--model",
                                    str(tiny_model_dir), "--steps", "4", "--strength", "0.5"])
    assert res.exit_code == 1
    assert "broken.png" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["dress.png", "shirt.png"]


def test_pickled_weights_are_refused_with_the_file_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "x.png").write_bytes(b"")
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o"),
                                    "--model", str(bad)])
    assert res.exit_code != 0
    assert "diffusion_pytorch_model.bin" in res.output and "never unpickles" in res.output


def test_invalid_method_flags_are_refused_before_any_work(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                    "--steps", "10", "--strength", "0.05"])
    assert res.exit_code == 2 and "no denoising step" in res.output
