"""`--lora FILE[:SCALE]` (r2r/lora.py): a LoRA fused into the model before export gives the graphs of the PyTorch
model with the LoRA applied, at its scale; the fused model is made once; non-safetensors files are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from r2r import graph_io
from r2r.lora import LoraSpec, fuse_loras, parse_lora
from r2r.manifest import read_manifest
from r2r.models import EMBEDDED_DEFAULT, ModelDefaults, model_defaults
from r2r.tiny import LATENT_CHANNELS as C

BOUND = 1e-4  # max|onnx - torch| / max|torch|, as the export parity tests


@pytest.fixture(scope="module")
def lora_pipe(tmp_path_factory: pytest.TempPathFactory):
    """The embedded default with a rank-4 LoRA on its UNet attention projections (random A and B, so the update is
    not zero), saved in diffusers' LoRA layout; the pipeline keeps the adapter unfused."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_DEFAULT, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="style"), safe_serialization=True)
    return pipe, folder / "pytorch_lora_weights.safetensors"


def test_lora_specs_take_an_optional_scale() -> None:
    assert parse_lora("style.safetensors") == LoraSpec(Path("style.safetensors"), 1.0)
    assert parse_lora("a/style.safetensors:0.6") == LoraSpec(Path("a/style.safetensors"), 0.6)
    assert parse_lora("c:/x/style.safetensors") == LoraSpec(Path("c:/x/style.safetensors"), 1.0)


def test_a_fused_then_exported_lora_equals_the_pytorch_model_with_the_lora(lora_pipe, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from r2r.engines.cli import main as export_main

    pipe, lora_file = lora_pipe
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(export_main, ["onnx", "--lora", f"{lora_file}:0.5", "--graph", "unet", "--out",
                                          str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    pipe.set_adapters("style", 0.5)  # the unfused PyTorch model at the same scale: the reference
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 32, 32, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample.numpy()
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample.numpy()
        pipe.unet.enable_adapters()
    m = read_manifest(tmp_path / "b")
    assert list(m.graphs) == [graph_io.UNET]  # `--graph unet`: that graph alone
    sess = ort.InferenceSession(str(tmp_path / "b" / m.graphs[graph_io.UNET].file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {graph_io.SAMPLE: x.numpy(), graph_io.TIMESTEP: t.numpy(),
                          graph_io.ENCODER_HIDDEN_STATES: ctx.numpy(),
                          graph_io.TAC_SRC: np.arange(2)})[0]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < BOUND
    assert np.abs(base - ref).max() / scale > 100 * BOUND  # the LoRA changed the model: the check can fail


def test_the_fused_model_is_made_once_and_keeps_the_base_defaults(lora_pipe, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, lora_file = lora_pipe
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    out = fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(lora_file, 0.5)], progress=lambda s: None)
    assert (out / "negative_embedding.safetensors").read_bytes() == (
        EMBEDDED_DEFAULT / "negative_embedding.safetensors").read_bytes()
    stamp = (out / "r2r_loras.json").stat().st_mtime_ns
    assert fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(lora_file, 0.5)], progress=lambda s: None) == out
    assert (out / "r2r_loras.json").stat().st_mtime_ns == stamp
    assert fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(lora_file, 1.0)], progress=lambda s: None) != out
    assert model_defaults(out) == ModelDefaults(256, 256, 1)  # the base's size; its measured interval is not theirs


def test_a_kohya_layout_lora_fuses_to_the_same_unet_as_its_diffusers_layout(lora_pipe, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    from r2r.models import load_components

    _, lora_file = lora_pipe
    unet_only = load_file(str(lora_file))
    assert all(k.startswith("unet.") for k in unet_only)
    save_file(unet_only, str(tmp_path / "diffusers.safetensors"))
    kohya: dict[str, torch.Tensor] = {}
    for key, value in unet_only.items():  # unet.a.b.to_q.lora_A.weight -> lora_unet_a_b_to_q.lora_down.weight
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(4.0)  # alpha = rank: the update at scale 1, as PEFT's lora_alpha=4
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    a = load_components(fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(tmp_path / "diffusers.safetensors")],
                                   progress=lambda s: None)).unet.state_dict()
    b = load_components(fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(tmp_path / "kohya.safetensors")],
                                   progress=lambda s: None)).unet.state_dict()
    base = load_components(EMBEDDED_DEFAULT).unet.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the LoRA changed the UNet


def test_a_text_encoder_lora_is_fused_in_either_key_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA on the text encoder's attention (diffusers' layout, and kohya's `lora_te_text_model_*`): the fused text
    encoder equals the PyTorch one with the adapter applied; both layouts fuse to the same weights. (The adapter is
    put on with peft's `inject_adapter_in_model`, which diffusers' loader uses too: transformers' own `add_adapter`
    wants a newer peft than the registry here has.)"""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    from r2r.models import load_components

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_DEFAULT, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    te = pipe.text_encoder
    torch.manual_seed(5)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), te)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "d", text_encoder_lora_layers=get_peft_model_state_dict(te),
                                              safe_serialization=True)
    diffusers_file = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    kohya: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(diffusers_file)).items():  # text_encoder.a.b.q_proj.lora_A.weight -> lora_te_...
        module, part = key.removeprefix("text_encoder.").rsplit(".lora_", 1)
        name = "lora_te_text_model_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    fused = [load_components(fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(f)], progress=lambda s: None)).text_encoder
             for f in (diffusers_file, tmp_path / "kohya.safetensors")]
    ids = pipe.tokenizer("a photo of a red dress", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = te(ids)[0]
        got = fused[0](ids)[0]
        base = load_components(EMBEDDED_DEFAULT).text_encoder(ids)[0]
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) / scale < BOUND
    assert float((base - ref).abs().max()) / scale > 100 * BOUND  # the LoRA changed the encoder: the check can fail
    a, b = fused[0].state_dict(), fused[1].state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_pickled_lora_is_refused(tmp_path: Path) -> None:
    from r2r.runtime.cli import main

    (tmp_path / "style.pt").write_bytes(b"not opened")
    res = CliRunner().invoke(main, ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--lora",
                                    str(tmp_path / "style.pt")])
    assert res.exit_code == 2 and "never unpickled" in res.output
