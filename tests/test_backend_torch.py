"""The PyTorch backend of the coupled scheduler (runtime/backend_torch.py) on the CPU: parity with the reference,
no buffer made inside the program, a program a CUDA graph can capture, and the `--gpu-check` rehearsal.

What these tests cannot tell (the GPU machine's check does): CUDA graph capture and replay themselves, fp16 / bf16
numerics on a GPU, flash-attention kernels, timings, GPU memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.engines import torch_kernels_note

from r2r.config import Method, Variant
from r2r.metrics import psnr
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
from r2r.reference import ReferencePipeline
from r2r.runtime.backend_torch import TorchBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.scheduler import CoupledScheduler

W = H = 256


@pytest.fixture(scope="module")
def renders() -> list[np.ndarray]:
    from r2r.training.data import render_pair, sample_design

    return [render_pair(sample_design(np.random.default_rng([11, i]), (W, H)), (W, H))[0] for i in range(2)]


@pytest.fixture(scope="module")
def reference(renders) -> dict[str, list[np.ndarray]]:
    ref = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, W, H)
    return {inv: ref(renders, Method(), inv) for inv in ("exact", "single-pass")}


@pytest.mark.parametrize("variant", [Variant(fused=True), Variant(fused=False), Variant("single-pass")],
                         ids=["fused", "emit-inject", "single-pass"])
def test_torch_backend_follows_the_reference_at_fp32(embedded_bundle: Path, renders, reference, variant) -> None:
    """The same model, the same TAC processor, the same update order: at fp32 the outputs are the reference's to
    within rounding (>= 45 dB on every image; measured: identical or a max abs error of 1)."""
    b = open_bundle(embedded_bundle)
    sched = CoupledScheduler(b, TorchBackend(b, EMBEDDED_DEFAULT, "cpu", "fp32"), 2, Method(), variant)
    got = sched(renders)
    for g, e in zip(got, reference[variant.inversion], strict=True):
        assert psnr(g, e) >= 45.0
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 2


def test_torch_backend_bf16_meets_the_reduced_precision_bar(embedded_bundle: Path, renders, reference) -> None:
    b = open_bundle(embedded_bundle)
    got = CoupledScheduler(b, TorchBackend(b, EMBEDDED_DEFAULT, "cpu", "bf16"), 2, Method(),
                           Variant(fused=True))(renders)
    assert all(psnr(g, e) >= 35.0 for g, e in zip(got, reference["exact"], strict=True)), torch_kernels_note()


def test_the_program_makes_no_buffer_and_is_capturable(embedded_bundle: Path) -> None:
    """What a CUDA graph capture needs, checked on the CPU: while the program runs no backend buffer is made, no
    value is read back to the host (`.item()`, data-dependent shapes), and two runs issue the same operations (no
    Python branching on tensor values). Not checked here: the capture itself, streams, allocator pools."""
    from r2r.benchmarks.gpu_check import Setup, capture_audit

    audit = capture_audit(Setup("cpu", W, H, Method(steps=10, strength=0.5), ("fp32",)), embedded_bundle.parent
                          / "audit")
    assert audit["same_ops_every_run"] and audit["ops_per_run"] > 1000
    assert audit["host_reads"] == [] and audit["buffers_made_inside"] == 0


def test_the_model_must_be_the_bundles(embedded_bundle: Path, tiny_model_dir: Path) -> None:
    from r2r.manifest import BundleError

    with pytest.raises(BundleError, match="not the model the bundle"):
        TorchBackend(open_bundle(embedded_bundle), tiny_model_dir, "cpu", "fp32")


def test_gpu_check_rehearses_on_the_cpu(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r2r.benchmarks.cli import main

    res = CliRunner().invoke(main, ["gpu-check", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rehearsal"] is True and report["device"] == "cpu"
    assert {r["precision"] for r in report["parity"]} == {"fp32", "bf16"}
    fp32 = next(r for r in report["parity"] if r["precision"] == "fp32")
    assert fp32["psnr_db"] >= 45.0
    names = [r["name"] for r in report["timings"]]
    assert names[0].startswith("public-code") and any("single-pass" in n for n in names)
    assert report["capture_audit"]["same_ops_every_run"] and report["capture_audit"]["buffers_made_inside"] == 0
    assert "CPU rehearsal: no GPU, no GPU figure" in (tmp_path / "report.md").read_text()


def test_r2r_run_backend_torch_runs_the_models_modules_from_a_graphless_bundle(tmp_path: Path, monkeypatch) -> None:
    """`--backend torch` runs this backend (no migration note any more) and caches a bundle of the manifest and
    conditioning alone (no ONNX graph exported)."""
    from click.testing import CliRunner
    from PIL import Image
    from support.pngs import png_params

    from r2r.runtime.cli import main

    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (256, 256), (200, 120, 80)).save(tmp_path / "shirt.png")
    res = CliRunner().invoke(main, ["--backend", "torch", "--input", str(tmp_path / "shirt.png"), "--output",
                                    str(tmp_path / "out"), "--steps", "10", "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    assert "now runs the PyTorch backend" not in res.output and "using the bundle of tiny" in res.output
    params = png_params(tmp_path / "out" / "shirt.png")
    assert params["backend"] == "torch" and params["precision"] == "fp32" and params["fused"] is True
    [bundle] = (tmp_path / "cache" / "bundles").iterdir()
    # no program graph: only the prompt encoder, which runs beside any backend
    assert bundle.name.endswith("-nographs") and [p.name for p in (bundle / "onnx").iterdir()] == ["text_encoder"]
