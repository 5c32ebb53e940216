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
    for args in (["--opt-level", "5"], ["--static-size"]):
        res = CliRunner().invoke(main, ["build-engines", "--backend", "openvino", *args, "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and args[0] in res.output and "TensorRT" in res.output
    res = CliRunner().invoke(main, ["build-engines", "--backend", "onnxruntime", "--precision", "fp16",
                                    "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "takes fp32" in res.output
    assert not (tmp_path / "b").exists()  # refused before anything was exported


def test_without_backend_build_engines_builds_what_r2r_run_runs_here(embedded_bundle: Path, tmp_path: Path) -> None:
    from r2r.backends import auto_choices

    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle, bundle)
    res = CliRunner().invoke(main, ["build-engines", "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    row, device = auto_choices()[0]
    precision = row.native_precision()
    assert f"r2r-export build-engines: {row.name} {precision} on {device}" in res.output
    assert any(k.startswith(f"{row.name}/") and read_manifest(bundle).engines[k].precision == precision
               for k in read_manifest(bundle).engines)


def test_int8_calibrates_on_the_method_and_meets_the_reduced_precision_bar(embedded_bundle: Path,
                                                                          tmp_path: Path) -> None:
    """OpenVINO int8: the UNet quantized (NNCF hybrid) on the reference's own UNet inputs; >= 35 dB against the
    fp32 reference on the trained default."""
    import numpy as np
    import openvino as ov
    from support.engines import openvino_kernels_note

    from r2r.backends import backend_row
    from r2r.config import Method, Variant
    from r2r.engines.int8 import calibration_renders
    from r2r.metrics import psnr
    from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
    from r2r.reference import ReferencePipeline
    from r2r.runtime.backend_ov import OpenVinoBackend
    from r2r.runtime.bundle_reader import open_bundle
    from r2r.runtime.scheduler import CoupledScheduler

    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle, bundle)
    res = CliRunner().invoke(main, ["build-engines", "--backend", "openvino", "--precision", "int8", "--out",
                                    str(bundle)])
    assert res.exit_code == 0, res.output
    assert "recording the UNet's inputs on 4 renders" in res.output and "120 calibration inputs" in res.output
    entry = read_manifest(bundle).engines["openvino/cpu-int8/unet"]
    model = ov.Core().read_model(str(bundle / entry.files[0]))
    assert sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) > 0
    renders = calibration_renders(read_manifest(bundle), 2, seed=99)  # not the calibration renders
    ref = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, 256, 256)
    expected = ref(renders, Method())
    b = open_bundle(bundle)
    got = CoupledScheduler(b, OpenVinoBackend(b, "int8"), 2, Method(), Variant(fused=True))(renders)
    assert all(psnr(g, e) >= 35.0 for g, e in zip(got, expected, strict=True)), openvino_kernels_note(
        b, bundle / entry.files[0], "bf16" if backend_row("openvino").native_precision() == "bf16" else "f32")
    assert not np.array_equal(got[0], CoupledScheduler(b, OpenVinoBackend(b, "fp32"), 1, Method(),
                                                       Variant(fused=True))(renders[:1])[0])
