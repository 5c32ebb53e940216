"""`r2r-export build-engines` on CPU: ONNX Runtime graphs and OpenVINO compiled models in the bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from r2r.engines.cli import main
from r2r.manifest import read_manifest, verify_files


def test_build_engines_onnxruntime_then_openvino_records_both_and_rebuilds_nothing(
        tiny_bundle: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    args = ["--model", str(tiny_model_dir), "--batch-max", "4", "--out", str(bundle)]
    res = CliRunner().invoke(main, ["build-engines", "--backend", "onnxruntime", *args])
    assert res.exit_code == 0, res.output
    assert "exported" not in res.output  # the ONNX bundle was up to date
    res = CliRunner().invoke(main, ["build-engines", "--backend", "openvino", "--precision", "bf16", *args])
    assert res.exit_code == 0, res.output
    m = read_manifest(bundle)
    ort = [k for k in m.engines if k.startswith("onnxruntime/cpu-fp32/")]
    assert len(ort) == len(m.graphs)
    ov = m.engines["openvino/cpu-bf16/all"]
    assert ov.files and all(f.startswith("engines/openvino/cache/") for f in ov.files)
    verify_files(bundle, m)
    res = CliRunner().invoke(main, ["build-engines", "--backend", "onnxruntime", *args])
    assert res.exit_code == 0 and "built in" not in res.output and "up to date" in res.output


def test_build_engines_tensorrt_without_tensorrt_names_the_extra(tiny_bundle: Path, tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    res = CliRunner().invoke(main, ["build-engines", "--backend", "tensorrt", "--precision", "fp16", "--model",
                                    str(tiny_model_dir), "--batch-max", "4", "--out", str(bundle)])
    assert res.exit_code == 1
    assert "pip install 'r2r[gpu]'" in res.output


def test_tensorrt_build_options_are_refused_for_other_backends(tmp_path: Path) -> None:
    for args in (["--opt-level", "5"], ["--refit"]):
        res = CliRunner().invoke(main, ["build-engines", "--backend", "openvino", *args, "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and args[0] in res.output and "TensorRT" in res.output
    res = CliRunner().invoke(main, ["build-engines", "--backend", "onnxruntime", "--precision", "fp16",
                                    "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "takes fp32" in res.output
    assert not (tmp_path / "b").exists()  # refused before anything was exported
