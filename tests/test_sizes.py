"""Any size, any aspect: the input policy, dynamic-size bundles, and outputs at each input's own size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r import graph_io
from r2r.config import Method
from r2r.manifest import BundleError, read_manifest
from r2r.metrics import psnr
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, load_components
from r2r.reference import ReferencePipeline
from r2r.runtime.assembly import SchedulerCache, run_batch
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.scheduler import CoupledScheduler
from r2r.sizing import SizeRange, place, prepare, restore

TINY = SizeRange(32, (64, 64), (2048, 2048), (256, 256))  # the embedded default's bundle


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.zeros((height, width, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, width)[None, :]
    x[..., 1] = np.linspace(0, 255, height)[:, None]
    x[..., 2] = (np.arange(width)[None, :] * 7 + np.arange(height)[:, None] * 3) % 256
    return x


# -- the policy ------------------------------------------------------------------------------------------------------

def test_an_input_the_bundle_takes_runs_at_its_own_size() -> None:
    for w, h in ((256, 192), (192, 256), (64, 2048), (1024, 1024)):
        p = place(w, h, TINY)
        assert p.exact and p.run == (w, h)


def test_other_inputs_are_scaled_to_the_budget_padded_to_the_multiple_and_come_back_at_their_size() -> None:
    p = place(300, 300, TINY)  # 90,000 px > the 256x256 budget: scaled down, aspect kept
    assert p.scaled == (256, 256) and p.run == (256, 256) and p.output == (300, 300)
    p = place(1000, 750, TINY)
    assert p.scaled == (296, 222) and p.run == (320, 224) and p.output == (1000, 750)
    p = place(200, 150, TINY)  # under the budget: never scaled up, only padded
    assert p.scaled == (200, 150) and p.run == (224, 160) and p.output == (200, 150)
    p = place(4000, 100, TINY)  # a long strip: the short side padded up to the bundle's minimum
    assert p.run[0] <= 2048 and p.run[1] == 64 and p.output == (4000, 100)
    for w, h in ((300, 300), (1000, 750), (200, 150), (4000, 100), (77, 1999)):
        p = place(w, h, TINY)
        assert TINY.takes(*p.run) and p.run[0] * p.run[1] <= 2 * 256 * 256


def test_padding_is_undone_exactly() -> None:
    img = _gradient(200, 150)
    p = place(200, 150, TINY)
    padded = prepare(img, p)
    assert padded.shape == (160, 224, 3)
    assert np.array_equal(restore(padded, p), img)
    assert np.array_equal(padded[0, 0], img[0, 0])  # edge replication: the corner pixel fills the corner pad
    white = prepare(img, p, pad="white")
    assert (white[:5] == 255).all() and np.array_equal(restore(white, p), img)


def test_max_pixels_caps_even_an_input_the_bundle_takes() -> None:
    p = place(1024, 1024, TINY, max_pixels=256 * 256)
    assert p.run == (256, 256) and p.output == (1024, 1024)


def test_crop_and_stretch() -> None:
    p = place(200, 150, TINY, "crop")
    assert p.run == (192, 128) and p.output == (192, 128)  # whole multiples of the input, centered
    out = restore(prepare(_gradient(200, 150), p), p)
    assert np.array_equal(out, _gradient(200, 150)[11:139, 4:196])
    p = place(1000, 750, TINY, "crop")
    assert TINY.takes(*p.run) and p.output[0] <= 1000 and p.output[1] <= 750
    p = place(1000, 750, TINY, "stretch")  # the public code's preprocessing: the native size, aspect ignored
    assert p.run == p.output == (256, 256)


# -- bundles of a size range -----------------------------------------------------------------------------------------

def test_the_default_bundle_records_its_range_and_leaves_every_spatial_dimension_free(embedded_bundle: Path) -> None:
    m = read_manifest(embedded_bundle)
    assert m.sizes == {"multiple": 32, "min": [64, 64], "opt": [256, 256], "max": [2048, 2048],
                       "static": False}
    unet = m.graphs[graph_io.UNET]
    assert next(t for t in unet.inputs if t.name == graph_io.SAMPLE).shape == ["B", 8, "4*hm", "4*wm"]
    emit = m.graphs[graph_io.UNET_EMIT]
    levels = [lyr["level"] for lyr in m.tac_plan["layers"]]
    for i, level in enumerate(levels):
        q = next(t for t in emit.outputs if t.name == graph_io.tac_q(i))
        assert q.shape[1:3] == [f"{4 >> level}*hm" if 4 >> level > 1 else "hm",
                                f"{4 >> level}*wm" if 4 >> level > 1 else "wm"]
    graph = onnx.load(str(embedded_bundle / m.graphs[graph_io.VAE_DECODER].file), load_external_data=False)
    dims = [d.dim_param for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["B", "", "32*hm", "32*wm"]  # the graph's own names are the contract's


def test_a_size_outside_the_range_is_refused_with_the_fix(embedded_bundle: Path) -> None:
    b = open_bundle(embedded_bundle)
    for size in ((250, 192), (32, 256), (4096, 256)):
        with pytest.raises(BundleError, match="--min-side/--max-side"):
            CoupledScheduler(b, OrtBackend(b), 1, Method(steps=5), size=size)


def test_the_default_bundle_at_256x192_is_within_45_db_of_the_reference_at_256x192(embedded_bundle: Path) -> None:
    """Parity at a size other than the export size: fp32 ONNX Runtime against the reference run at that size."""
    from r2r.training.data import render_pair, sample_design

    size = (256, 192)
    renders = [render_pair(sample_design(np.random.default_rng([9, i]), size), size)[0] for i in range(2)]
    assert renders[0].shape == (192, 256, 3)
    ref = ReferencePipeline(load_components(EMBEDDED_DEFAULT), EMBEDDED_DEFAULT / EMBEDDING_FILE, *size)
    expected = ref(renders, Method())
    b = open_bundle(embedded_bundle)
    got = CoupledScheduler(b, OrtBackend(b), 2, Method(), size=size)(renders)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == (192, 256, 3)
        assert psnr(g, e) >= 45.0


def test_the_scheduler_cache_keeps_one_scheduler_per_size_and_drops_the_least_recent() -> None:
    made: list[tuple[int, int]] = []

    def make(size: tuple[int, int]) -> object:
        made.append(size)
        return object()

    cache = SchedulerCache(make, keep=2)
    a = cache.get((64, 64))
    assert cache.get((64, 64)) is a and made == [(64, 64)]  # buffers once per size, reused
    cache.get((96, 64))
    cache.get((64, 64))
    cache.get((128, 64))  # drops (96, 64), the least recently used
    assert len(cache) == 2 and cache.get((64, 64)) is a
    cache.get((96, 64))
    assert made == [(64, 64), (96, 64), (128, 64), (96, 64)]
    unbounded = SchedulerCache(make, keep=None)
    for w in range(64, 64 + 32 * 10, 32):
        unbounded.get((w, 64))
    assert len(unbounded) == 10


def test_a_partial_batch_runs_at_the_next_power_of_two_not_padded_to_the_full_batch() -> None:
    assert [run_batch(k, 4) for k in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [run_batch(k, 6) for k in (1, 3, 5, 6)] == [1, 4, 6, 6]
    with pytest.raises(ValueError, match="5 images for a batch of 4"):
        run_batch(5, 4)
    batches: list[int] = []

    class Scheduler:
        def __init__(self, key: tuple) -> None:
            self.batch = key[2]
            batches.append(self.batch)

        def __call__(self, images: list[np.ndarray], on_step: object, text: object = None) -> list[np.ndarray]:
            assert len(images) <= self.batch
            return images

    cache = SchedulerCache(Scheduler, keep=None, batch=4)
    image = np.zeros((64, 64, 3), np.uint8)
    for k in (1, 3, 4, 2, 1):
        assert len(cache.translate([image] * k, None, Method())) == k
    assert batches == [1, 4, 2]  # one scheduler per run batch of the size, made once


# -- r2r-run ---------------------------------------------------------------------------------------------------------

def test_r2r_run_writes_each_output_at_its_inputs_size_by_default(default_bundle: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One bundle of the embedded default, no flag: 256x192, 192x256, 300x300 and 1000x750 come back as they went."""
    from r2r.runtime.cli import main

    cache = tmp_path / "cache"  # a copy of the session's cached bundle, so the engines built here stay here
    shutil.copytree(default_bundle, cache / "bundles" / default_bundle.name)
    monkeypatch.setenv("R2R_CACHE", str(cache))

    sizes = [(256, 192), (192, 256), (300, 300), (1000, 750)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for w, h in sizes:
        Image.fromarray(_gradient(w, h)).save(inputs / f"render_{w}x{h}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--input", str(inputs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported in" not in result.output  # the one bundle serves every size
    for w, h in sizes:
        with Image.open(out / f"render_{w}x{h}.png") as im:
            assert im.size == (w, h)
            params = json.loads(im.text["r2r:parameters"])
        assert params["fit"] == "pad" and params["source"] == f"render_{w}x{h}.png"
