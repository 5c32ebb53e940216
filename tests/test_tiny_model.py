"""The locally built tiny SD-1.x-family model: loadable offline by diffusers, safetensors only,
deterministic, 3 latent levels at 256x256, a working CLIP BPE tokenizer and textual inversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from r2r import tiny

GARMENT_WORDS = ("dress", "jacket", "sweater", "trousers", "sneakers", "denim", "floral", "navy", "striped")


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def embedding_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_random_embedding(model_dir, tmp_path_factory.mktemp("ti") / "rendered.safetensors")


def _load(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stable_diffusion_pipeline_loads_offline_with_sd1_components(model_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = _load(model_dir)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.config.requires_safety_checker is False
    sched = dict(pipe.scheduler.config)
    assert {k: sched[k] for k in tiny.scheduler_kwargs()} == tiny.scheduler_kwargs()
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    # Pooling at eos needs the real id (2 would select transformers' legacy argmax path).
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id != 2
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert json.loads((model_dir / tiny.DEFAULTS_FILE).read_text()) == {"width": 256, "height": 256}


def test_tokenizer_directory_loads_with_clip_tokenizer(model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert tok.pad_token == "<|endoftext|>"  # as in SD 1.5
    # CLIP's layout: the two special tokens are the highest ids.
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)
    merges = (model_dir / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")


def test_only_safetensors_weight_files_are_written(model_dir: Path) -> None:
    forbidden = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx"}
    assert not [p for p in model_dir.rglob("*") if p.suffix in forbidden]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((model_dir / sub).glob("*.safetensors")), sub


def test_same_seed_is_byte_identical_and_other_seed_differs(model_dir: Path, tmp_path: Path) -> None:
    again = _files(tiny.build_tiny_model(tmp_path / "again", seed=0))
    assert again == _files(model_dir)
    other = _files(tiny.build_tiny_model(tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    weights = [k for k in again if k.endswith(".safetensors")]
    assert len(weights) == 3
    for k in weights:
        assert other[k] != again[k], k


def test_build_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "stale.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_model(tmp_path)


def test_256px_image_gives_three_unet_latent_levels(model_dir: Path) -> None:
    pipe = _load(model_dir)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean
    assert latent.shape == (1, tiny.LATENT_CHANNELS, 32, 32)

    seen: list[tuple[int, ...]] = []
    hooks = [
        block.resnets[0].register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape[-2:])))
        for block in (*pipe.unet.down_blocks, pipe.unet.mid_block)
    ]
    try:
        with torch.no_grad():
            out = pipe.unet(latent, 10, encoder_hidden_states=torch.zeros(1, 77, 64)).sample
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(32, 32), (16, 16), (8, 8), (8, 8)]
    assert out.shape == latent.shape


def test_tokenizer_keeps_garment_words_whole_and_pads_to_77(model_dir: Path) -> None:
    pipe = _load(model_dir)
    tok = pipe.tokenizer
    for word in GARMENT_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    text = "a navy striped denim jacket"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert ids[6] == tok.eos_token_id  # bos + 5 words + eos
    assert ids[7:] == [tok.pad_token_id] * 70 and tok.pad_token_id == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_any_text_tokenizes_through_byte_fallback(model_dir: Path) -> None:
    pipe = _load(model_dir)
    tok = pipe.tokenizer
    text = "Ürün 日本 👗 x1_y2 {weird}"
    ids = tok(text).input_ids
    inner = ids[1:-1]
    assert inner and tok.eos_token_id not in inner  # the unk token is eos: nothing fell to unk
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_extra_words_are_learned_into_single_tokens(tmp_path: Path) -> None:
    word = "zorblaxian"
    plain = tiny.build_tokenizer(tmp_path / "plain")
    extended = tiny.build_tokenizer(tmp_path / "extended", words=[word, "Zorblaxian coats"])
    assert len(plain.tokenize(word)) > 1
    assert extended.tokenize(word) == [word + "</w>"]
    assert len(extended) > len(plain)


def test_random_embedding_is_one_float32_key_at_token_embedding_scale(
    model_dir: Path, embedding_file: Path
) -> None:
    from safetensors.torch import load_file

    state = load_file(str(embedding_file))
    assert list(state) == ["<rendered>"]
    emb = state["<rendered>"]
    assert emb.dtype == torch.float32 and emb.shape == (75, tiny.TINY_TEXT_CONFIG.hidden_size)
    table = _load(model_dir).text_encoder.get_input_embeddings().weight
    assert emb.std().item() == pytest.approx(table.std().item(), rel=0.1)
    with pytest.raises(ValueError):
        tiny.build_random_embedding(model_dir, embedding_file.with_name("x.safetensors"), num_vectors=76)


def test_textual_inversion_fills_the_context_with_75_new_tokens(
    model_dir: Path, embedding_file: Path
) -> None:
    pipe = _load(model_dir)
    tok = pipe.tokenizer
    before = len(tok)
    pipe.load_textual_inversion(str(embedding_file), token="<rendered>")
    assert len(tok) == before + 75
    new_tokens = ["<rendered>"] + [f"<rendered>_{i}" for i in range(1, 75)]
    new_ids = tok.convert_tokens_to_ids(new_tokens)
    assert sorted(new_ids) == list(range(before, before + 75))

    prompt = pipe.maybe_convert_prompt("<rendered>", tok)
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert ids == [tok.bos_token_id, *new_ids, tok.eos_token_id]

    from safetensors.torch import load_file

    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[new_ids], load_file(str(embedding_file))["<rendered>"])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("<rendered>", "cpu", 1, False)
    assert embeds.shape == (1, 77, tiny.TINY_TEXT_CONFIG.hidden_size)


def test_full_pipeline_renders_256x256_rgb(model_dir: Path) -> None:
    pipe = _load(model_dir)
    out = pipe(
        prompt="",
        num_inference_steps=2,
        height=256,
        width=256,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images
    assert image.shape == (1, 256, 256, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
