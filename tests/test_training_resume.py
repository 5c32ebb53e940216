"""Interrupted training resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from r2r.training.loop import CheckpointError, LoopConfig

RES = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "ds", 8, (RES, RES), seed=1, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.tiny import build_tiny_model
    from r2r.training.data import CAPTION_WORDS

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1, words=CAPTION_WORDS)


def _cfg(**kw: object) -> LoopConfig:
    base = {"batch_size": 2, "grad_accum": 2, "max_steps": 4, "lr": 1e-3, "checkpoint_every": 2, "seed": 5,
            "ema": True, "ema_decay": 0.9, "progress": False}
    return LoopConfig(**{**base, **kw})


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_finetune_killed_midway_resumes_to_the_same_weights(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from r2r.training.cli import main
    from r2r.training.finetune import FinetuneConfig, finetune

    whole = finetune(FinetuneConfig(model_dir, data_dir, tmp_path / "whole", _cfg(), resolution=RES))
    assert whole.completed and whole.step == 4 and len(whole.losses) == 4

    # "killed" after 3 steps: the last checkpoint is step 2, step 3 is lost, no model is written
    cut = finetune(FinetuneConfig(model_dir, data_dir, tmp_path / "cut", _cfg(stop_after=3), resolution=RES))
    assert not cut.completed and cut.step == 3 and cut.output is None
    assert not (tmp_path / "cut" / "model").exists()
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert json.loads((tmp_path / "cut" / "checkpoints" / "step-00000002" / "state.json").read_text())["step"] == 2

    # resumed through the CLI with the same options
    args = ["finetune", "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "cut"),
            "--resolution", str(RES), "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--lr", "1e-3",
            "--checkpoint-every", "2", "--seed", "5", "--ema", "--ema-decay", "0.9", "--no-progress", "--resume"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "step 4" in res.output
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4]  # step 3 ran twice: before the kill and after resume
    assert log[3]["loss"] == pytest.approx(log[2]["loss"], abs=0)  # the same batch, noise and weights

    a, b = _unet(tmp_path / "whole"), _unet(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_options_and_names_the_checkpoint(model_dir: Path, data_dir: Path,
                                                               tmp_path: Path) -> None:
    from r2r.training.finetune import FinetuneConfig, finetune

    finetune(FinetuneConfig(model_dir, data_dir, tmp_path / "run", _cfg(stop_after=2), resolution=RES))
    with pytest.raises(CheckpointError, match=r"step-00000002.*lr"):
        finetune(FinetuneConfig(model_dir, data_dir, tmp_path / "run", _cfg(resume=True, lr=5e-4), resolution=RES))


def test_a_save_killed_before_the_latest_marker_is_ignored(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """The marker is written last: a half-written temp folder and a newer folder without marker are skipped."""
    from r2r.training.embedding import EmbeddingConfig, train_negative_embedding

    cfg = EmbeddingConfig(model_dir, data_dir, tmp_path / "emb", _cfg(stop_after=2, lr=1e-2, ema=False),
                          resolution=RES)
    train_negative_embedding(cfg)
    ck = tmp_path / "emb" / "checkpoints"
    (ck / ".step-00000004.tmp-dead").mkdir()
    (ck / ".step-00000004.tmp-dead" / "trainable.safetensors").write_bytes(b"half")
    whole = train_negative_embedding(EmbeddingConfig(model_dir, data_dir, tmp_path / "whole",
                                                     _cfg(lr=1e-2, ema=False), resolution=RES))
    resumed = train_negative_embedding(EmbeddingConfig(model_dir, data_dir, tmp_path / "emb",
                                                       _cfg(lr=1e-2, ema=False, resume=True), resolution=RES))
    assert resumed.completed and resumed.step == 4 and len(resumed.losses) == 2
    assert not (ck / ".step-00000004.tmp-dead").exists()
    assert torch.equal(load_file(str(whole.output))["<rendered>"], load_file(str(resumed.output))["<rendered>"])


def test_a_latest_marker_naming_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    from r2r.training.loop import latest_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match=r"latest.*step-00000009.*delete"):
        latest_checkpoint(tmp_path)


def test_pretrain_tiny_is_deterministic_and_ships_a_complete_default(tmp_path: Path) -> None:
    """Two runs of the whole recipe (a few steps per stage) write byte-identical weights and embedding."""
    import hashlib

    from r2r.models import EMBEDDING_FILE, load_embedding
    from r2r.training.data import generate_dataset
    from r2r.training.pretrain import PretrainConfig, pretrain_tiny

    data = generate_dataset(tmp_path / "data", 6, (RES, RES), seed=4, progress=False)
    steps = {"vae_steps": 2, "unet_steps": 2, "finetune_steps": 1, "embedding_steps": 1, "vae_batch_size": 2,
             "unet_batch_size": 2, "finetune_batch_size": 2, "embedding_batch_size": 2, "progress": False,
             "ablation": False}
    outs = [pretrain_tiny(PretrainConfig(data, tmp_path / f"run{k}", **steps)) for k in range(2)]

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.safetensors"))}

    assert digest(outs[0]) == digest(outs[1])
    names = {p.name for p in outs[0].iterdir()}
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json", "r2r_defaults.json",
            EMBEDDING_FILE, "training.json"} <= names
    token, vectors = load_embedding(outs[0] / EMBEDDING_FILE)
    assert token == "<rendered>" and vectors.shape == (75, 64)
    scaling = json.loads((outs[0] / "vae" / "config.json").read_text())["scaling_factor"]
    assert scaling != pytest.approx(0.18215)  # recalibrated to 1 / std of the training latents
    prov = json.loads((outs[0] / "training.json").read_text())
    assert set(prov["stage_seconds"]) == {"vae", "latents", "pretrain-unet", "finetune", "negative-embedding"}
    configs = list(outs[0].glob("*/config.json"))
    assert len(configs) == 3 and not [c for c in configs if "_name_or_path" in json.loads(c.read_text())]
    assert str(tmp_path) not in "".join(p.read_text() for p in outs[0].rglob("*.json"))  # no machine path ships
