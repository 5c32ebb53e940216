"""`r2r-run --ray` on a local Ray cluster (runtime/ray_run.py): the outputs of one process, bit for bit; an actor
killed mid-batch loses nothing and writes nothing twice; broken files are failed records; results.jsonl holds
exactly one record per input; the cluster is shut down with no process left behind."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r.runtime.ray_run import RESULTS_FILE, RayConfig, parse_actors

ray = pytest.importorskip("ray", reason="the Ray extra: pip install 'r2r[ray]' (make test installs it)")

SIZES = [(256, 256), (256, 192), (192, 256), (256, 256), (300, 300), (256, 192), (256, 256)]
STEPS = ["--steps", "4", "--strength", "0.5"]


def _ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local cluster whose workers import the tests' support package (the faulty actor) and know where its one
    death is recorded."""
    from support.ray_faults import MARKER_ENV

    marker = tmp_path_factory.mktemp("fault")
    before = _ray_processes()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent), MARKER_ENV: str(marker)}})
    yield marker
    ray.shutdown()
    for _ in range(50):
        if _ray_processes() == before:
            break
        time.sleep(0.2)
    assert _ray_processes() == before, "the test cluster left processes behind"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.data import render_pair, sample_design

    folder = tmp_path_factory.mktemp("renders")
    for i, (w, h) in enumerate(SIZES):
        img = render_pair(sample_design(np.random.default_rng([5, i]), (w, h)), (w, h))[0]
        Image.fromarray(img).save(folder / f"render{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return folder


@pytest.fixture(scope="module")
def single(embedded_bundle: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run: the reference for every Ray run."""
    from r2r.runtime.cli import main

    out = tmp_path_factory.mktemp("single")
    res = CliRunner().invoke(main, ["--engine", str(embedded_bundle), "--backend", "onnxruntime", "--input",
                                    str(inputs), "--output", str(out), "--batch-size", "2", "--threads", "1", *STEPS])
    assert res.exit_code == 1 and "broken.png" in res.output  # the broken file fails alone
    assert len(list(out.glob("*.png"))) == len(SIZES)
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _records(out: Path) -> dict[str, dict]:
    lines = (out / RESULTS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_input = {Path(r["input"]).name: r for r in records}
    assert len(by_input) == len(records), "an input has more than one record"
    return by_input


def test_ray_local_writes_the_single_process_outputs_bit_for_bit_and_one_record_per_input(
        cluster, embedded_bundle: Path, inputs: Path, single: Path, tmp_path: Path) -> None:
    from r2r.runtime.cli import main

    out = tmp_path / "ray"
    args = ["--engine", str(embedded_bundle), "--backend", "onnxruntime", "--input", str(inputs), "--output",
            str(out), "--batch-size", "2", "--threads", "1", "--ray", "local", "--actors", "2", *STEPS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output  # the broken file: a failed record, and the exit code says so
    records = _records(out)
    assert set(records) == {f"render{i}.png" for i in range(len(SIZES))} | {"broken.png"}
    assert records["broken.png"]["status"] == "failed" and "broken.png" in records["broken.png"]["error"]
    for i, (w, h) in enumerate(SIZES):
        rec = records[f"render{i}.png"]
        assert rec["status"] == "ok" and rec["written"] and len(rec["params"]) == 16
        got = _pixels(out / f"render{i}.png")
        assert got.shape == (h, w, 3)
        assert np.array_equal(got, _pixels(single / f"render{i}.png")), f"render{i}.png differs from one process"
    # --resume: every complete output is a skipped record, nothing is written again
    res = CliRunner().invoke(main, [*args, "--resume"])
    assert res.exit_code == 1 and "0 written, 7 skipped (complete), 1 failed" in res.output, res.output
    again = _records(out)
    assert {n: r["status"] for n, r in again.items()} == {**{n: "skipped" for n in records if n != "broken.png"},
                                                         "broken.png": "failed"}


def test_an_actor_killed_mid_batch_loses_nothing_and_writes_nothing_twice(
        cluster, embedded_bundle: Path, inputs: Path, single: Path, tmp_path: Path) -> None:
    from support.ray_faults import DiesOnSecondBatch

    from r2r.config import Method
    from r2r.imageio import collect_inputs
    from r2r.runtime.assembly import RunConfig, prepare_run
    from r2r.runtime.ray_run import translate_on_ray

    cfg = RunConfig(engine=embedded_bundle, backend="onnxruntime", batch=2, threads=1,
                    method=Method(steps=4, strength=0.5))
    prepared = prepare_run(cfg, progress=lambda s: None)
    out = tmp_path / "ray"
    records = translate_on_ray(prepared, cfg, collect_inputs([str(inputs)]), out, RayConfig("local", 1, 1),
                               translator=DiesOnSecondBatch)
    died = (cluster / "died").read_text()  # the input whose output the dead attempt wrote
    by_input = _records(out)
    assert len(records) == len(by_input) == len(SIZES) + 1
    for i in range(len(SIZES)):
        name = f"render{i}.png"
        assert by_input[name]["status"] == "ok"
        assert by_input[name]["written"] == (name != Path(died).name)  # the retry found that one complete
        assert np.array_equal(_pixels(out / name), _pixels(single / name))
    assert not list(out.glob(".*.tmp-*"))  # no temporary of the dead attempt left as an output


def test_actors_are_a_fixed_pool_or_a_range_and_default_to_the_clusters_room() -> None:
    assert parse_actors("3") == (3, 3) and parse_actors("1:4") == (1, 4)
    for bad in ("0", "4:2", "x", "1:"):
        with pytest.raises(ValueError, match="--actors"):
            parse_actors(bad)
    assert RayConfig("local", threads=2).pool({"CPU": 16.0}) == (8, 8)
    assert RayConfig("auto", gpus=1.0).pool({"CPU": 64.0, "GPU": 8.0}) == (8, 8)
    assert RayConfig("auto", 2, 6).pool({"CPU": 2.0}) == (2, 6)
