"""Users' models as they have them (r2r/checkpoints.py, r2r/models.py): single-file LDM checkpoints convert to the
same weights, other architectures and pickles are refused by what they are, SD 1.x's tokenizer is built offline
with SD 1.5's ids, and A1111 embeddings give the diffusers layout's conditioning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from support.ldm_layout import write_ldm_checkpoint

from r2r.checkpoints import SOURCE_FILE, build_clip_tokenizer, identify, read_header, resolve_model
from r2r.models import (
    EMBEDDED_DEFAULT,
    EMBEDDING_FILE,
    ModelDefaults,
    ModelLoadError,
    encode_conditioning,
    load_components,
    model_defaults,
)

needs_clip_vocab = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                      reason="CLIP's vocabulary: pip install --no-deps open-clip-torch")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k].to(dtype) if dtype else sa[k], sb[k].to(dtype) if dtype else sb[k])]


def test_the_embedded_default_as_an_ldm_checkpoint_loads_back_bit_identical_and_is_cached(
        cache: Path, tmp_path: Path) -> None:
    ref = load_components(EMBEDDED_DEFAULT)
    ckpt = write_ldm_checkpoint(ref, tmp_path / "tiny.safetensors")
    converted = resolve_model(ckpt, progress=lambda s: None)
    assert converted.parent == cache / "models"
    assert json.loads((converted / SOURCE_FILE).read_text())["family"] == "tiny"
    got = load_components(converted)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(ref, name), getattr(got, name)) == [], name
    # the family's size; the step-cache interval was measured on the embedded weights, not on whatever a file holds
    assert model_defaults(converted) == ModelDefaults(256, 256, 1)
    stamp = (converted / SOURCE_FILE).stat().st_mtime_ns
    assert resolve_model(ckpt, progress=lambda s: None) == converted  # the second time: the cache, not converted
    assert (converted / SOURCE_FILE).stat().st_mtime_ns == stamp


def test_r2r_run_on_a_checkpoint_writes_what_it_writes_on_the_directory(cache: Path, tmp_path: Path,
                                                                        stripes_image) -> None:
    from PIL import Image

    from r2r.runtime.cli import main

    ckpt = write_ldm_checkpoint(load_components(EMBEDDED_DEFAULT), tmp_path / "tiny.safetensors")
    (tmp_path / "in").mkdir()
    Image.fromarray(stripes_image(0)).save(tmp_path / "in" / "shirt.png")
    # the interval given: the directory's own default is 3, the converted model's 1 (its weights were not measured)
    common = ["--input", str(tmp_path / "in"), "--backend", "torch", "--steps", "4", "--strength", "0.5",
              "--embedding", str(EMBEDDED_DEFAULT / EMBEDDING_FILE), "--cache-interval", "3"]
    a = CliRunner().invoke(main, [*common, "--model", str(EMBEDDED_DEFAULT), "--output", str(tmp_path / "dir")])
    b = CliRunner().invoke(main, [*common, "--model", str(ckpt), "--output", str(tmp_path / "ckpt")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dir" / "shirt.png")),
                          np.asarray(Image.open(tmp_path / "ckpt" / "shirt.png")))


def _header_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


def test_checkpoints_of_other_architectures_are_refused_by_what_they_are(tmp_path: Path) -> None:
    cases = {
        "sdxl": ({"conditioner.embedders.1.model.ln_final.weight": (4,)}, "an SDXL checkpoint"),
        "sd2": ({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": (4,)}, "an SD 2.x checkpoint"),
        "inpaint": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "an inpainting UNet"),
        "unet-only": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
                      "the VAE, the CLIP text encoder missing"),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "SD3 / Flux"),
    }
    for name, (shapes, what) in cases.items():
        path = _header_file(tmp_path / f"{name}.safetensors", shapes)
        with pytest.raises(ModelLoadError, match=what):
            identify(path, read_header(path))
    (tmp_path / "model.ckpt").write_bytes(b"not opened")
    with pytest.raises(ModelLoadError, match=r"never unpickles.*weights_only=True"):
        resolve_model(tmp_path / "model.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        resolve_model(tmp_path / "bad.safetensors")


@needs_clip_vocab
def test_the_sd1_tokenizer_built_offline_gives_sd15_token_ids(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer(tmp_path / "tok"), local_files_only=True)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    # SD 1.5's tokenizer: "a" 320, "photo" 1125, "of" 539, "cat" 2368, "woman" 2308, "red" 736, "," 267
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Woman, red").input_ids == [49406, 320, 2308, 267, 736, 49407]
    assert tok("")["input_ids"] == [49406, 49407]


@needs_clip_vocab
def test_an_sd15_architecture_checkpoint_loads_with_the_shipped_configs_alone(cache: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from r2r.models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    torch.manual_seed(0)
    parts = SimpleNamespace(unet=UNet2DConditionModel(**SD15_UNET_CONFIG), vae=AutoencoderKL(**SD15_VAE_CONFIG),
                            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG, vocab_size=49408)))
    ckpt = write_ldm_checkpoint(parts, tmp_path / "sd15.safetensors", dtype=torch.float16)  # as most are shared
    converted = resolve_model(ckpt, progress=lambda s: None)
    assert json.loads((converted / SOURCE_FILE).read_text())["family"] == "SD 1.x"
    got = load_components(converted)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(parts, name), getattr(got, name), torch.float16) == [], name
    assert len(got.tokenizer) == 49408


def test_an_a1111_embedding_gives_the_conditioning_of_the_diffusers_one(tmp_path: Path) -> None:
    comps = load_components(EMBEDDED_DEFAULT)
    vectors = torch.randn(75, comps.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    save_file({"<rendered>": vectors}, str(tmp_path / "diffusers.safetensors"))
    save_file({"emb_params": vectors}, str(tmp_path / "a1111.safetensors"))
    # named after a piece of the vocabulary ("ing"): its token becomes "<ing>" instead of taking the piece's id
    save_file({"string_to_param.*": vectors[:8]}, str(tmp_path / "ing.safetensors"))
    save_file({"<rendered>": vectors[:8]}, str(tmp_path / "short.safetensors"))
    ref = encode_conditioning(comps, tmp_path / "diffusers.safetensors")
    got = encode_conditioning(comps, tmp_path / "a1111.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    short = encode_conditioning(comps, tmp_path / "short.safetensors")
    named = encode_conditioning(comps, tmp_path / "ing.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(short, named, strict=True))
    save_file({"clip_l": vectors, "clip_g": vectors.clone()}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="an SDXL embedding"):
        encode_conditioning(comps, tmp_path / "sdxl.safetensors")
    save_file({"emb_params": vectors[:, :32].contiguous()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ModelLoadError, match="vectors of width 32"):
        encode_conditioning(comps, tmp_path / "narrow.safetensors")


def test_token_gives_an_embedding_another_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--token`: a file whose own token cannot serve (here a diffusers file whose key the tokenizer already has)
    is read under another; the vectors and the conditioning are the file's."""
    from r2r.models import load_embedding, with_token

    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    comps = load_components(EMBEDDED_DEFAULT)
    vectors = torch.randn(8, comps.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    taken = next(t for t in comps.tokenizer.get_vocab() if t.startswith("<") and len(t) > 2)
    save_file({taken: vectors}, str(tmp_path / "clash.safetensors"))
    save_file({"<style>": vectors}, str(tmp_path / "style.safetensors"))
    with pytest.raises(ModelLoadError, match="already exists in the tokenizer"):
        encode_conditioning(comps, tmp_path / "clash.safetensors")
    renamed = with_token(tmp_path / "clash.safetensors", "<style>")
    token, got = load_embedding(renamed)
    assert token == "<style>" and torch.equal(got, vectors)
    ref = encode_conditioning(comps, tmp_path / "style.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(encode_conditioning(comps, renamed), ref, strict=True))
    assert with_token(tmp_path / "clash.safetensors", "<style>") == renamed  # made once
    with pytest.raises(ModelLoadError, match="one word"):
        with_token(tmp_path / "clash.safetensors", "two words")
