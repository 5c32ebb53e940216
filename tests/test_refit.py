"""Weight maps (export/weight_map.py): the bundle's UNet graph rewritten with another model's weights equals that
model's fresh export, output for output; another architecture is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.loras import unet_lora

from r2r import graph_io
from r2r.export.weight_map import RefitError, refit_graph, weight_map
from r2r.manifest import read_manifest
from r2r.models import EMBEDDED_DEFAULT, load_components
from r2r.tiny import LATENT_CHANNELS as C


def _unet_params(model: Path) -> dict[str, np.ndarray]:
    return {"unet." + k: v.numpy() for k, v in load_components(model).unet.state_dict().items()}


def _run(graph: Path) -> np.ndarray:
    g = torch.Generator().manual_seed(2)
    feed = {graph_io.SAMPLE: torch.randn(2, C, 32, 32, generator=g).numpy(), graph_io.TIMESTEP: np.array([400.0],
                                                                                                         np.float32),
            graph_io.ENCODER_HIDDEN_STATES: torch.randn(2, 77, 64, generator=g).numpy(), graph_io.TAC_SRC: np.arange(2)}
    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_a_refitted_unet_graph_equals_the_fresh_export_of_the_new_model(embedded_bundle: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from r2r.export.bundle_writer import ExportConfig, export_bundle
    from r2r.lora import LoraSpec, fuse_loras

    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    new = fuse_loras(EMBEDDED_DEFAULT, [LoraSpec(unet_lora(tmp_path / "lora", 3))], progress=lambda s: None)
    fresh = tmp_path / "fresh"
    export_bundle(ExportConfig(new, new / "negative_embedding.safetensors", fresh, 256, 256, 4, 256,
                               graphs=(graph_io.UNET,)), progress=lambda s: None)

    bundle = Path(shutil.copytree(embedded_bundle, tmp_path / "bundle"))
    graph = bundle / read_manifest(bundle).graphs[graph_io.UNET].file
    mapping = weight_map(graph, _unet_params(EMBEDDED_DEFAULT))
    assert sum(t for (_, t), *_ in mapping.values()) > 0  # transposed MatMul weights are found too
    before = _run(graph)
    changed = refit_graph(graph, mapping, _unet_params(new))
    assert 0 < len(changed) < len(mapping)  # the LoRA's projections, not the rest
    after = _run(graph)
    want = _run(fresh / read_manifest(fresh).graphs[graph_io.UNET].file)
    assert np.array_equal(after, want)
    assert not np.array_equal(after, before)  # the weights did change: the check can fail
    assert not list(graph.parent.parent.glob(".*.tmp-*"))

    # a graph with external data (as SD 1.5's are) is patched in a copy of its data file; its structure stays
    ext = tmp_path / "external" / "unet.onnx"
    ext.parent.mkdir()
    model = onnx.load(str(embedded_bundle / read_manifest(embedded_bundle).graphs[graph_io.UNET].file))
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.onnx.data", size_threshold=1024)
    structure, data = ext.read_bytes(), (ext.parent / "unet.onnx.data").read_bytes()
    assert sorted(refit_graph(ext, mapping, _unet_params(new))) == sorted(changed)
    assert np.array_equal(_run(ext), want)
    assert ext.read_bytes() == structure and (ext.parent / "unet.onnx.data").read_bytes() != data


def test_refit_refuses_a_model_of_another_architecture(embedded_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(embedded_bundle, tmp_path / "bundle"))
    graph = bundle / read_manifest(bundle).graphs[graph_io.UNET].file
    mapping = weight_map(graph, _unet_params(EMBEDDED_DEFAULT))
    other = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype) for k, v in _unet_params(EMBEDDED_DEFAULT).items()}
    with pytest.raises(RefitError, match="another architecture"):
        refit_graph(graph, mapping, other)
    assert np.array_equal(_run(graph),
                          _run(embedded_bundle / read_manifest(embedded_bundle).graphs[graph_io.UNET].file))
