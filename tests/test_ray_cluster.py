"""`r2r-run --ray auto` as on a cluster: a head started with `ray start --head`, the driver a separate process that
joins it through RAY_ADDRESS, inputs and outputs at fsspec URLs (`file://` here, which every process of the node
sees). The outputs are the single-process run's, bit for bit, and the cluster stops with no process left behind."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r.imageio import load_rgb
from r2r.runtime.ray_run import RESULTS_FILE

pytest.importorskip("ray", reason="the Ray extra: pip install 'r2r[ray]' (make test installs it)")

STEPS = ["--steps", "4", "--strength", "0.5", "--threads", "1", "--backend", "onnxruntime"]
RAY = str(Path(sys.executable).with_name("ray"))


def _ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A one-node cluster as an operator starts one (`ray start --head`, token authentication on, as docs/scale-out.md
    says), stopped by its own signal after; yields the environment a driver joins it with."""
    before = _ray_processes()
    address = f"127.0.0.1:{_free_port()}"
    # the driver has finished when the head is stopped: nothing to drain (Ray's default waits 30 s for idle workers)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"}
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={address.split(':')[1]}",
                             "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True).returncode:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the head did not come up in 120 s"
            time.sleep(1)
        yield {**env, "RAY_ADDRESS": address}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        for _ in range(100):
            if _ray_processes() == before:
                break
            time.sleep(0.3)
    assert _ray_processes() == before, "the head left processes behind"


def test_ray_auto_joins_a_started_head_and_writes_url_outputs_like_one_process(
        head: dict[str, str], embedded_bundle: Path, tmp_path: Path) -> None:
    from r2r.runtime.cli import main
    from r2r.training.data import render_pair, sample_design

    inputs = tmp_path / "renders"
    inputs.mkdir()
    for i, (w, h) in enumerate([(256, 256), (256, 192), (256, 256)]):
        img = render_pair(sample_design(np.random.default_rng([9, i]), (w, h)), (w, h))[0]
        Image.fromarray(img).save(inputs / f"render{i}.png")
    single = CliRunner().invoke(main, ["--engine", str(embedded_bundle), "--input", str(inputs), "--output",
                                       str(tmp_path / "single"), *STEPS])
    assert single.exit_code == 0, single.output

    out = tmp_path / "ray-out"
    run = subprocess.run([str(Path(sys.executable).with_name("r2r-run")), "--engine", str(embedded_bundle), "--input",
                          f"file://{inputs}/", "--output", f"file://{out}", "--ray", "auto", "--actors", "2",
                          *STEPS], env=head, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 written, 0 skipped (complete), 0 failed" in run.stderr and "Ray auto" in run.stderr
    for i in range(3):
        name = f"render{i}.png"
        assert np.array_equal(load_rgb(out / name), load_rgb(tmp_path / "single" / name)), name
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    assert sorted(Path(r["input"]).name for r in records) == [f"render{i}.png" for i in range(3)]
    assert {r["status"] for r in records} == {"ok"} and all(r["output"].startswith("file://") for r in records)
    assert not list(out.glob(".*.tmp-*"))
