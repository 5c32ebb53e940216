"""Training across processes: `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU (a gloo
group on the CPU) of `r2r-train finetune` and `negative-embedding` follows one process with the same global batch
(2 processes x batch 1 against 1 process x batch 1 x grad-accum 2: the same samples and the same noise, gradients
averaged by DDP instead of accumulated), writes its checkpoints and result once (the main process), and resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from r2r.models import EMBEDDING_FILE

RES = 64
TOLERANCE = 1e-4  # relative, per step's loss: the float rounding of a DDP mean against an accumulated sum


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.tiny import build_random_embedding, build_tiny_model
    from r2r.training.data import CAPTION_WORDS

    root = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, words=CAPTION_WORDS)
    build_random_embedding(root, root / EMBEDDING_FILE)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "ds", 10, (RES, RES), seed=0, test_fraction=0.2,
                            progress=False)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _train(args: list[str], processes: int) -> None:
    """One plain process, or `accelerate launch` of several on the CPU: its distributed launcher (torch's) with
    ACCELERATE_USE_CPU, which makes them a gloo group (`--cpu` alone would start a single process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if processes == 1:
        cmd = [sys.executable, "-m", "r2r.training.cli", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", _free_port(), "-m", "r2r.training.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOLERANCE * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("command", ["finetune", "negative-embedding"])
def test_two_processes_follow_one_process_with_the_same_global_batch_and_resume(
        command: str, model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    common = [command, "--model", str(model_dir), "--data", str(data_dir), "--resolution", str(RES), "--seed", "3",
              "--batch-size", "1", "--checkpoint-every", "2", "--no-progress", "--lr", "1e-3"]
    _train([*common, "--out", str(tmp_path / "one"), "--grad-accum", "2", "--max-steps", "3"], processes=1)
    _train([*common, "--out", str(tmp_path / "two"), "--max-steps", "3"], processes=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 3 and _close(one, two), (one, two)
    # one writer: the same checkpoints and result files as one process, none half-written
    listing = {p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*")}
    assert {p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*")} == listing
    # resume: stopped at step 2, continued to 3 under two processes, the same trajectory
    _train([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "2"], processes=2)
    _train([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "3", "--resume"], processes=2)
    assert _close(_losses(tmp_path / "resumed"), one), (_losses(tmp_path / "resumed"), one)
