"""Attention downsampling as an exported program variant (docs/design.md, "Less work per image"): the embedded
default's bundle with `--attention-pool 2` follows the PyTorch reference with the same pool at the 45 dB bar, on
ONNX Runtime (the default fused program; the emit/inject and single-pass programs' pooled graphs under `slow`) and on
the torch backend (every program, with the scheduler's pooled key buffers); `r2r-run --attention-pool` finds or
exports that bundle and records the pool; a bundle without the pool refuses it with the export command; no pool
leaves today's bundle as it was."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.manifest import BundleError
from r2r.metrics import psnr
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
from r2r.reference import ReferencePipeline
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.outputs import PARAMS_KEY
from r2r.runtime.scheduler import CoupledScheduler, bundle_graphs

W = H = 256
POOL = 2


def _pooled(cache: Path, graphs: tuple[str, ...]) -> Path:
    from r2r.runtime.select import cached_bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R2R_CACHE", str(cache))
        return cached_bundle(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT / EMBEDDING_FILE, W, H, 4, 256,
                             progress=lambda s: None, graphs=graphs, attention_pool=POOL)


@pytest.fixture(scope="module")
def pooled_bundle(r2r_cache: Path) -> Path:
    """The embedded default's bundle with attention pool 2, as `r2r-run --attention-pool 2` exports it: the graphs of
    the default (fused) program."""
    return _pooled(r2r_cache, bundle_graphs(Variant(fused=True)))


@pytest.fixture(scope="module")
def renders() -> list[np.ndarray]:
    from r2r.training.data import render_pair, sample_design

    return [render_pair(sample_design(np.random.default_rng([11, i]), (W, H)), (W, H))[0] for i in range(2)]


@pytest.fixture(scope="module")
def reference(renders) -> Callable[[int, str], list[np.ndarray]]:
    """`reference(pool, inversion)`: the PyTorch reference's outputs on the renders, each computed once."""
    pipe = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, W, H)
    return functools.cache(lambda pool, inversion: pipe(renders, Method(attention_pool=pool), inversion))


def _follows_the_pooled_reference(bundle: Path, reference, renders, variant: Variant, backend=None) -> None:
    b = open_bundle(bundle)
    method = b.method(Method())
    assert b.attention_pool == POOL and method.attention_pool == POOL  # the bundle's pool, when none is given
    expected = reference(POOL, variant.inversion)
    got = CoupledScheduler(b, backend(b) if backend else OrtBackend(b), 2, method, variant)(renders)
    full = reference(1, variant.inversion)
    for g, e, f in zip(got, expected, full, strict=True):
        db = psnr(g, e)
        print(f"pool {POOL} {variant}: {'ONNX Runtime' if backend is None else 'torch'} fp32 vs the pooled reference "
              f"{db:.1f} dB (the pooled reference vs the full method {psnr(e, f):.1f} dB)")
        assert db >= 45.0
        assert psnr(e, f) < db  # the pool changes the image more than the export does: the check can fail


def test_the_pooled_default_program_follows_the_pooled_reference_at_45_db(pooled_bundle: Path, reference,
                                                                         renders) -> None:
    _follows_the_pooled_reference(pooled_bundle, reference, renders, Variant(fused=True))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [Variant(), Variant("single-pass")], ids=["emit-inject", "single-pass"])
def test_the_pooled_emit_and_inject_graphs_follow_the_pooled_reference_at_45_db(r2r_cache: Path, reference, renders,
                                                                               variant: Variant) -> None:
    """The pooled key crosses the graphs here: `unet_emit`'s tac_k outputs on the pooled grid, `unet_inject`'s
    inputs (the bundle of every graph: one more export, hence `slow`)."""
    _follows_the_pooled_reference(_pooled(r2r_cache, graph_io.DEFAULT_GRAPHS), reference, renders, variant)


@pytest.mark.parametrize("variant", [Variant(fused=True), Variant(), Variant("single-pass")],
                         ids=["fused", "emit-inject", "single-pass"])
def test_the_torch_backend_runs_the_bundles_pool_in_every_program(pooled_bundle: Path, reference, renders,
                                                                  variant: Variant) -> None:
    """The model's modules with the bundle's pool installed, and the scheduler's Q/K buffers on the pooled key's grid
    (emit/inject, single-pass): the pooled reference's numbers."""
    from r2r.runtime.backend_torch import TorchBackend

    _follows_the_pooled_reference(pooled_bundle, reference, renders, variant,
                                  lambda b: TorchBackend(b, EMBEDDED_DEFAULT, "cpu", "fp32"))


def test_r2r_run_with_attention_pool_uses_the_pooled_bundle_and_records_it(pooled_bundle: Path, r2r_cache: Path,
                                                                          renders, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from r2r.runtime.cli import main

    monkeypatch.setenv("R2R_CACHE", str(r2r_cache))
    (tmp_path / "in").mkdir()
    Image.fromarray(renders[0]).save(tmp_path / "in" / "shirt.png")
    before = sorted(p.name for p in (r2r_cache / "bundles").iterdir())
    res = CliRunner().invoke(main, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                    "--attention-pool", str(POOL), "--cache-interval", "1", "--backend",
                                    "onnxruntime", "--steps", "10", "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (r2r_cache / "bundles").iterdir()) == before  # found, not exported again
    params = json.loads(Image.open(tmp_path / "out" / "shirt.png").text[PARAMS_KEY])
    assert params["attention_pool"] == POOL and f"-p{POOL}" in pooled_bundle.name


def test_a_bundle_without_the_pool_refuses_it_with_the_export_command_and_no_pool_changes_nothing(
        embedded_bundle: Path) -> None:
    b = open_bundle(embedded_bundle)
    assert "pool" not in b.manifest.tac_plan and b.attention_pool == 1  # today's plan, so today's graph keys
    assert b.method(Method()).attention_pool == 1
    with pytest.raises(BundleError, match=f"r2r-export onnx --attention-pool {POOL}"):
        b.check(b.method(Method(attention_pool=POOL)), 1)
    with pytest.raises(ValueError, match="attention_pool must be one of 1, 2, 4"):
        Method(attention_pool=3)

