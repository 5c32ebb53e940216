"""r2r-bench's parts that are not timing: the public-code baseline's evaluation count, the reports."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from r2r.benchmarks.public_code import PublicCodePipeline
from r2r.benchmarks.report import markdown, summarize
from r2r.config import Method
from r2r.models import Components


def test_public_code_evaluates_the_unet_90_times_per_image(tiny_components: Components, tiny_model_dir: Path) -> None:
    comps = copy.copy(tiny_components)
    comps.unet = copy.deepcopy(tiny_components.unet)  # the baseline installs its own processors
    pipe = PublicCodePipeline(comps, tiny_model_dir / "negative_embedding.safetensors", 256, 256)
    img = np.full((256, 256, 3), 200, np.uint8)
    out = pipe([img], Method())
    assert out[0].shape == (256, 256, 3)
    assert pipe.evaluations / pipe.images == 90


def _result(name: str, wall: float, evals: float) -> dict:
    per = {"encode": 0.1 * wall, "inversion": 0.3 * wall, "generation": 0.5 * wall, "decode": 0.1 * wall}
    return {"config": {"name": name, "batch": 1, "outputs": ""}, "passes": [
        {"wall_s": wall * 2, "images": 2, "per_image_s": per}, {"wall_s": wall * 2.2, "images": 2, "per_image_s": per}],
        "unet_evaluations_per_image": evals, "peak_rss_mb": 500.0,
        "fidelity_vs_torch_reference": {"psnr_db": [50.0, 48.0], "max_abs_error": 3}}


def test_report_states_ratios_against_public_code_and_fidelity_beside_speed() -> None:
    rows = [summarize(_result("public-code", 2.0, 90)), summarize(_result("onnxruntime-fp32-b1", 0.5, 58))]
    assert rows[1]["latency_s"]["min"] == 0.5 and rows[1]["latency_s"]["max"] == 0.55
    report = {"machine": {"cpu": {"model": "cpu", "isa": ["avx512f"]}, "logical_cpus": 2, "memory_gib": 24,
                          "gpu": "none", "versions": {"r2r": "0"}}, "model": "m", "resolution": [256, 256],
              "method": "defaults", "images": 2, "repeats": 2, "command": "r2r-bench",
              "host_overhead": {"fused": {"ms_per_step_median": 0.01, "ms_per_step_min": 0.009}}}
    md = markdown(report, rows)
    line = next(x for x in md.splitlines() if x.startswith("| onnxruntime-fp32-b1"))
    assert "4.00x" in line and "| 58 |" in line and "| 48.0 |" in line


def test_attention_profile_calls_the_unet_at_the_requested_size_and_openvino_fuses_every_attention(
        tiny_bundle: Path) -> None:
    """`r2r-bench --attention` feeds the routed UNet at the size asked (the graph's own dimension expressions), not
    at a placeholder; OpenVINO's CPU plugin fuses each attention of the graph, the TAC layers' included."""
    from r2r.benchmarks.attention import CALL_BATCH, AttentionConfig, _feeds, run
    from r2r.manifest import read_manifest

    m = read_manifest(tiny_bundle)
    graph = str(tiny_bundle / m.graphs["unet"].file)
    cfg = AttentionConfig("ov", "openvino", graph, width=192, height=256, multiple=int(m.sizes["multiple"]),
                          precision="fp32", threads=1, repeats=1)
    feeds = _feeds(cfg)
    assert feeds["sample"].shape[0] == CALL_BATCH and feeds["sample"].shape[2:] == (256 // 8, 192 // 8)
    assert feeds["tac_src"].tolist() == [0, 1, 0]
    result = run(cfg)
    assert result["attention_layers"] > 0 and result["fused_attention_nodes"] == result["attention_layers"]
    assert result["call_ms_min"] > 0 and 0 < result["attention_share"] < 1


def test_a_crashed_worker_is_reported_with_its_signal() -> None:
    from r2r.benchmarks.cli import exit_reason

    assert exit_reason(-11) == "crashed (signal 11, SIGSEGV)"
    assert exit_reason(-9) == "crashed (signal 9, SIGKILL)"
    assert exit_reason(1) == "failed (exit code 1)"


@pytest.mark.parametrize(("args", "says"), [(["--quick"], "Every backend beside"),
                                           (["--attention", "--size", "64x64"], "Where a UNet call's time"),
                                           (["--ray", "--images", "4"], "One r2r-run process"),
                                           (["--gpu-check"], "The GPU path's parity")])
def test_the_old_flags_still_run_their_subcommand(args: list[str], says: str) -> None:
    from click.testing import CliRunner

    from r2r.benchmarks.cli import main

    res = CliRunner().invoke(main, [*args, "--help"])
    assert res.exit_code == 0 and says in res.output, res.output
