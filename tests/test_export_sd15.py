"""SD 1.5-architecture export (random weights, no download): external data, TAC layers, ORT parity.

Marked slow: it builds an 860M-parameter UNet and a 3.4 GB graph (minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from r2r import graph_io
from r2r.export.graphs import UNetEmit, unet_specs
from r2r.export.to_onnx import Sizes, export_graph
from r2r.models import SD15_UNET_CONFIG
from r2r.tac import install_tac, plan_tac

pytestmark = pytest.mark.slow


def test_sd15_unet_emit_exports_with_external_data_and_keeps_parity(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    plan = plan_tac(unet.config, 256, 256, 256)
    assert len(plan.layers) == 10
    assert {lyr.name.split(".attentions")[0] for lyr in plan.layers} == {
        "down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"}
    state = install_tac(unet, plan)
    module = UNetEmit(unet, state, plan).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 32, 32, generator=g), torch.tensor([281.0]), torch.randn(2, 77, 768, generator=g))
    path = tmp_path / "unet_emit" / "unet_emit.onnx"
    _, outputs, external = export_graph(module, args, unet_specs(plan)[graph_io.UNET_EMIT], path, batch_max=2,
                                         sizes=Sizes(64))
    assert external
    assert path.stat().st_size < 100_000_000  # weights live beside it, not inside the protobuf
    assert sum(f.stat().st_size for f in path.parent.iterdir()) > 3_000_000_000
    assert [t.name for t in outputs] == [graph_io.EPS, *graph_io.tac_names(10)]

    x = (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([101.0]), torch.randn(1, 77, 768, generator=g))
    with torch.no_grad():
        ref = module(*x)
    del module, unet
    so = ort.SessionOptions()
    so.enable_mem_pattern = False
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {graph_io.SAMPLE: x[0].numpy(), graph_io.TIMESTEP: x[1].numpy(),
                          graph_io.ENCODER_HIDDEN_STATES: x[2].numpy()})
    for a, r in zip(got, ref, strict=True):
        r = r.numpy()
        assert a.shape == r.shape  # Q/K on their level's grid, [B, h_l, w_l, C], in both
        assert np.abs(a - r).max() / np.abs(r).max() < 1e-4
