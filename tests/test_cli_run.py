"""`r2r-run`: one PNG per input, named after it, parameters inside; failures and --resume."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from support.pngs import png_params

from r2r.runtime.cli import main


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


def test_reference_writes_one_png_per_input_with_parameters(tiny_model_dir: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--backend", "reference", "--input", str(tmp_path / "in"), "--output", str(out),
                                    "--model", str(tiny_model_dir), "--steps", "10", "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["dress.png", "shirt.png"]
    with Image.open(out / "dress.png") as im:
        assert im.size == (180, 200) and im.mode == "RGB"  # the input's own size
    params = png_params(out / "shirt.png")
    assert params["steps"] == 10 and params["strength"] == 0.5 and params["tac_divisor"] == 256
    assert params["fit"] == "pad" and params["source"] == "shirt.png" and params["backend"] == "reference"
    assert "2 written, 0 skipped (complete), 0 failed" in res.output
    assert "19 UNet evaluations per image" in res.output  # n = 5, window 4: 5 + 4 + 2 * 5


def test_engine_run_records_the_bundle_hash_and_resume_skips_done_work(tiny_bundle: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--engine", str(tiny_bundle), "--input", str(tmp_path / "in"), "--output", str(out),
            "--backend", "onnxruntime", "--steps", "10", "--strength", "0.5", "--fused", "off"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    params = png_params(out / "dress.png")
    assert params["backend"] == "onnxruntime" and params["fused"] is False and len(params["bundle_sha256"]) == 64
    (out / "shirt.png").write_bytes((out / "shirt.png").read_bytes()[:100])  # a truncated output
    res = CliRunner().invoke(main, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "1 written, 1 skipped (complete)" in res.output
    res = CliRunner().invoke(main, [*args, "--resume", "--guidance", "3"])
    assert "2 written, 0 skipped" in res.output  # other parameters: nothing counts as done


def test_a_broken_input_fails_alone_and_sets_the_exit_code(tiny_bundle: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--engine", str(tiny_bundle), "--input", str(tmp_path / "in"),
                                    "--output", str(out), "--steps", "4", "--strength", "0.5", "--batch-size", "2"])
    assert res.exit_code == 1
    assert "broken.png" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["dress.png", "shirt.png"]


def test_pickled_weights_are_refused_with_the_file_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    res = CliRunner().invoke(main, ["--backend", "reference", "--input", str(tmp_path / "x.png"),
                                    "--output", str(tmp_path / "o"), "--model", str(bad)])
    assert res.exit_code != 0
    assert "diffusion_pytorch_model.bin" in res.output and "never unpickles" in res.output


def test_flags_the_bundle_does_not_support_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    res = CliRunner().invoke(main, ["--engine", str(tiny_bundle), "--input", str(tmp_path / "x.png"),
                                    "--output", str(tmp_path / "o"), "--tac-divisor", "64"])
    assert res.exit_code == 1 and "r2r-export onnx --tac-divisor 64" in res.output


def test_invalid_method_flags_are_refused_before_any_work(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    res = CliRunner().invoke(main, ["--backend", "reference", "--input", str(tmp_path / "x.png"),
                                    "--output", str(tmp_path / "o"), "--steps", "10", "--strength", "0.05"])
    assert res.exit_code == 2 and "no denoising step" in res.output  # a usage error, before any work
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o"),
                                    "--tac-ratio", "1.5"])
    assert res.exit_code == 2 and "--tac-ratio" in res.output and "1.5" in res.output


def test_flags_that_do_not_apply_are_refused_by_name(tiny_bundle: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    base = ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "out")]
    cases = [
        (["--engine", str(tiny_bundle), "--model", str(tiny_model_dir)], "--model"),
        (["--engine", str(tiny_bundle), "--width", "128"], "--width"),
        (["--engine", str(tiny_bundle), "--token", "<style>"], "--token"),
        (["--backend", "reference", "--fused", "on"], "--fused"),
        (["--backend", "reference", "--engine", str(tiny_bundle)], "--engine"),
        (["--backend", "reference", "--precision", "bf16"], "fp32 only"),
        (["--engine", str(tiny_bundle), "--backend", "onnxruntime", "--precision", "bf16"], "takes fp32"),
        (["--engine", str(tiny_bundle), "--backend", "openvino", "--device", "cuda"], "runs on cpu"),
        (["--engine", str(tiny_bundle), "--precision", "int4"], "int4"),
    ]
    for args, named in cases:
        res = CliRunner().invoke(main, [*base, *args])
        assert res.exit_code != 0 and named in res.output, (args, res.output)
        assert not (tmp_path / "out").exists()


def test_without_engine_the_models_own_bundle_is_used_from_the_cache(tiny_bundle: Path, tiny_model_dir: Path,
                                                                      tmp_path: Path, monkeypatch) -> None:
    """--model is honoured on the bundle path: its bundle in the cache (a copy of the fixture's, which r2r-run
    exported) is found, not re-exported; the backend's engines are built into it once, then reused."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_bundle, cache / "bundles" / tiny_bundle.name)
    monkeypatch.setenv("R2R_CACHE", str(cache))
    _write_inputs(tmp_path / "in")
    args = ["--model", str(tiny_model_dir), "--backend", "onnxruntime", "--input", str(tmp_path / "in" / "shirt.png"),
            "--steps", "4", "--strength", "0.5"]
    res = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "up to date" in res.output and "exported in" not in res.output
    assert "building the onnxruntime fp32 engines" in res.output and "MultiHeadAttention" in res.output
    assert sorted(p.name for p in (cache / "bundles").iterdir()) == [tiny_bundle.name]
    res = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "again")])
    assert res.exit_code == 0 and "building" not in res.output
    params = png_params(tmp_path / "again" / "shirt.png")
    manifest = (cache / "bundles" / tiny_bundle.name / "manifest.json").read_bytes()
    assert params["bundle_sha256"] == hashlib.sha256(manifest).hexdigest()
