"""Shared fixtures: a seeded random-init tiny model of the embedded default's family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
def tiny_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's ONNX bundle at 256x256, batch 1-4 (exported once per session, ~1 min)."""
    from r2r.export.bundle import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundle")
    export_bundle(ExportConfig(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", out, 256, 256,
                               batch_max=4), progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def embedded_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped embedded default's bundle (exported once per session)."""
    from r2r.export.bundle import ExportConfig, export_bundle
    from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE

    out = tmp_path_factory.mktemp("embedded-bundle")
    export_bundle(ExportConfig(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT / EMBEDDING_FILE, out, 256, 256, batch_max=2),
                  progress=lambda s: None)
    return out
