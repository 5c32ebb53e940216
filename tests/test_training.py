"""DKI training on tiny data: the finetune learns, the negative embedding touches nothing but its vectors
and loads in diffusers, outputs are diffusers-loadable, checkpoints are safetensors/JSON only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from r2r.models import EMBEDDING_FILE, encode_conditioning, load_components, load_embedding
from r2r.training.loop import LoopConfig, data_indices, step_generator

RES = 64
SEED = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "ds", 10, (RES, RES), seed=0, test_fraction=0.2,
                            progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.tiny import build_random_embedding, build_tiny_model
    from r2r.training.data import CAPTION_WORDS

    root = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, words=CAPTION_WORDS)
    build_random_embedding(root, root / EMBEDDING_FILE)  # a stale embedding the finetune must not copy
    return root


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fixed_batch_loss(model: Path, data: Path, seed: int, n: int) -> float:
    """The loss of the micro-batch that step 0 of a run with `seed` trains on, with step 0's noise."""
    from r2r.training.finetune import (
        CaptionEncoder,
        ImageFolder,
        OnlineLatents,
        TimestepSampler,
        UNetTask,
        resolve_folder,
    )

    comps = load_components(model)
    images = ImageFolder.open(resolve_folder(data, "real"), RES)
    task = UNetTask(comps, OnlineLatents(images, comps.vae, comps.scaling_factor), images.captions,
                    CaptionEncoder(comps.tokenizer, comps.text_encoder), TimestepSampler())
    idx = data_indices(seed, len(images), 0, n)
    with torch.no_grad():
        return float(task.loss(comps.unet, idx, step_generator(seed, 0)))


@pytest.fixture(scope="module")
def finetuned(model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.training.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = FinetuneConfig(model_dir, data_dir, out, LoopConfig(batch_size=8, max_steps=1, lr=1e-4, seed=SEED,
                                                              progress=False), resolution=RES)
    result = finetune(cfg)
    assert result.completed and result.step == 1
    return out


def test_one_finetune_step_lowers_the_loss_on_a_fixed_batch(model_dir: Path, data_dir: Path, finetuned: Path) -> None:
    before = _fixed_batch_loss(model_dir, data_dir, SEED, 8)
    after = _fixed_batch_loss(finetuned / "model", data_dir, SEED, 8)
    assert after < before, (before, after)


def test_finetune_writes_a_diffusers_directory_where_only_the_unet_changed(model_dir: Path, finetuned: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = finetuned / "model"
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    src, dst = _tree_hashes(model_dir), _tree_hashes(out)
    assert EMBEDDING_FILE not in dst  # trained for the old UNet: not carried over
    changed = {k for k in dst if src.get(k) != dst[k]}
    assert changed <= {"unet/diffusion_pytorch_model.safetensors", "unet/config.json"}
    assert "unet/diffusion_pytorch_model.safetensors" in changed
    config = {k: v for k, v in json.loads((out / "unet" / "config.json").read_text()).items() if k != "_name_or_path"}
    assert config == {k: v for k, v in json.loads((model_dir / "unet" / "config.json").read_text()).items()
                      if k != "_name_or_path"}
    assert set(dst) == set(src) - {EMBEDDING_FILE}


def test_checkpoints_hold_only_safetensors_and_json(finetuned: Path) -> None:
    from safetensors import safe_open

    root = finetuned / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000001"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"latest", "state.json", "trainable.safetensors", "optimizer.safetensors"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and not p.read_bytes().startswith(b"PK")  # no pickle, no torch zip
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as fh:
                assert list(fh.keys())
    # nothing in the run folder is a pickle either
    assert not [p for p in finetuned.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_a_lora_finetune_trains_the_adapter_alone_and_writes_a_lora_that_lora_takes(
        model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    from r2r.lora import LoraSpec, fuse_loras
    from r2r.training.finetune import LORA_SUBDIR, LORA_WEIGHTS, FinetuneConfig, finetune

    out = tmp_path / "run"
    cfg = FinetuneConfig(model_dir, data_dir, out, LoopConfig(batch_size=8, max_steps=1, lr=1e-3, seed=SEED,
                                                              progress=False), resolution=RES, lora_rank=4)
    assert finetune(cfg).completed
    with safe_open(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors"), framework="pt") as fh:
        trained = list(fh.keys())
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)  # the frozen UNet is not saved
    lora = out / LORA_SUBDIR / LORA_WEIGHTS
    with safe_open(str(lora), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}  # noqa: SIM118
    assert all(k.startswith("unet.") for k in shapes)
    assert {min(s) for k, s in shapes.items() if "lora_A" in k} == {4}
    assert _fixed_batch_loss(out / "model", data_dir, SEED, 8) < _fixed_batch_loss(model_dir, data_dir, SEED, 8)
    assert not (out / "model" / EMBEDDING_FILE).exists()  # trained for the old UNet: not carried over
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    fused = fuse_loras(model_dir, [LoraSpec(lora)], progress=lambda s: None)  # what --lora OUT/lora/... runs
    a, b = load_components(out / "model").unet.state_dict(), load_components(fused).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_negative_embedding_changes_only_its_vectors_and_loads_in_diffusers(
        finetuned: Path, data_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from r2r.training.embedding import EmbeddingConfig, _make_module, initial_vectors, train_negative_embedding

    model = finetuned / "model"
    files_before = _tree_hashes(model)
    comps = load_components(model)
    params_before = {f"{name}.{k}": v.detach().clone() for name in ("unet", "vae", "text_encoder")
                     for k, v in getattr(comps, name).state_dict().items()}
    cfg = EmbeddingConfig(model, data_dir, tmp_path / "emb",
                          LoopConfig(batch_size=4, max_steps=2, lr=1e-2, adam_weight_decay=0.0, seed=SEED,
                                     progress=False), resolution=RES)
    result = train_negative_embedding(cfg, components=comps)
    assert result.completed and result.output == tmp_path / "emb" / EMBEDDING_FILE

    # every other parameter byte-identical, in memory and on disk
    for name in ("unet", "vae", "text_encoder"):
        for k, v in getattr(comps, name).state_dict().items():
            before = params_before[f"{name}.{k}"]
            assert v.numpy().tobytes() == before.numpy().tobytes(), f"{name}.{k} changed"
    assert _tree_hashes(model) == files_before

    # the file: one key, the token, [75, d]; all 75 rows moved from their initial value
    token, vectors = load_embedding(result.output, comps.text_encoder.config.hidden_size)
    assert token == "<rendered>" and vectors.shape == (75, 64)
    init = initial_vectors(comps, 75, cfg.init_word, cfg.init_noise, cfg.loop.seed)
    assert (vectors - init).abs().amax(dim=1).gt(0).all()

    # diffusers loads it, and its rows are the file's
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    vocab = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(result.output), token="<rendered>")
    assert len(pipe.tokenizer) == vocab + 75
    ids = pipe.tokenizer.convert_tokens_to_ids(["<rendered>"] + [f"<rendered>_{i}" for i in range(1, 75)])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vectors)

    # training saw exactly the conditioning inference computes (r2r.models.encode_conditioning)
    from r2r.training.embedding import PlaceholderPrompt

    module = _make_module(comps.text_encoder, PlaceholderPrompt(comps.tokenizer, "<rendered>", 75), vectors)
    with torch.no_grad():
        trained_cond = module()
    _, c_neg = encode_conditioning(comps, result.output)
    torch.testing.assert_close(trained_cond, c_neg, rtol=1e-5, atol=1e-5)


def test_a_new_run_refuses_a_folder_with_checkpoints(model_dir: Path, data_dir: Path, finetuned: Path) -> None:
    from r2r.training.finetune import FinetuneConfig, finetune
    from r2r.training.loop import CheckpointError

    cfg = FinetuneConfig(model_dir, data_dir, finetuned, LoopConfig(max_steps=1, progress=False), resolution=RES)
    with pytest.raises(CheckpointError, match="--resume"):
        finetune(cfg)


def test_data_order_is_a_seeded_permutation_per_epoch() -> None:
    first = data_indices(7, 5, 0, 10)
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5))
    assert first[:5] != first[5:] or data_indices(7, 5, 10, 5) != first[:5]
    assert data_indices(7, 5, 3, 4) == first[3:7]  # any position is known without replaying the stream
    assert data_indices(8, 5, 0, 10) != first
