"""Shared fixtures: a seeded random-init tiny model of the embedded default's family, and synthetic test images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _stripes_image(seed: int, height: int = 256, width: int = 256) -> np.ndarray:
    """A garment-like ellipse of two-coloured stripes on white (colours and stripe width from `seed`)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - height // 2) / 90.0) ** 2 + ((xx - width // 2) / 70.0) ** 2 < 1
    stripes = ((xx + 2 * yy) // int(rng.integers(3, 8))) % 2 == 0
    img[mask & stripes] = rng.integers(0, 255, 3)
    img[mask & ~stripes] = rng.integers(0, 255, 3)
    return img


@pytest.fixture(scope="session")
def stripes_image() -> Callable[[int], np.ndarray]:
    """`stripes_image(seed)`: a 256x256 uint8 RGB test image (test modules cannot import conftest helpers)."""
    return _stripes_image


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r2r.tiny import build_random_embedding, build_tiny_model

    root = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(root, seed=0)
    build_random_embedding(root, root / "negative_embedding.safetensors", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir: Path):
    from r2r.models import load_components

    return load_components(tiny_model_dir)


@pytest.fixture(scope="session")
def r2r_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's R2R_CACHE: tiny_bundle and embedded_bundle are the bundles r2r-run exports there."""
    return tmp_path_factory.mktemp("r2r-cache")


def _cached(cache: Path, model: Path, batch_max: int, graphs: tuple[str, ...] | None = None) -> Path:
    from r2r import graph_io
    from r2r.runtime.select import cached_bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R2R_CACHE", str(cache))
        return cached_bundle(model, model / "negative_embedding.safetensors", 256, 256, batch_max, 256,
                             progress=lambda s: None, graphs=graph_io.DEFAULT_GRAPHS if graphs is None else graphs)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir: Path, r2r_cache: Path) -> Path:
    """The tiny model's ONNX bundle at 256x256, batch 1-4 (exported once per session, ~1 min), as `r2r-run --model
    TINY` finds it in the cache."""
    return _cached(r2r_cache, tiny_model_dir, 4)


@pytest.fixture(scope="session")
def embedded_bundle(r2r_cache: Path) -> Path:
    """The shipped embedded default's bundle (exported once per session), as `r2r-run` finds it in the cache."""
    from r2r.models import EMBEDDED_DEFAULT

    return _cached(r2r_cache, EMBEDDED_DEFAULT, 4)


@pytest.fixture(scope="session")
def default_bundle(r2r_cache: Path, embedded_bundle: Path) -> Path:
    """The bundle `r2r-run` with no flag runs the embedded default from: its step-cache program (the model's own
    interval, 3), as r2r-run finds it in the cache (its VAE graphs copied from `embedded_bundle`'s)."""
    from r2r.config import Variant
    from r2r.models import EMBEDDED_DEFAULT
    from r2r.runtime.scheduler import bundle_graphs

    return _cached(r2r_cache, EMBEDDED_DEFAULT, 4, bundle_graphs(Variant(fused=True), step_cache=True))
