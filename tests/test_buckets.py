"""Training takes any size: aspect-ratio buckets for `r2r-train finetune` and `negative-embedding`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2r.training.finetune import (
    CachedLatents,
    ImageFolder,
    aspect_buckets,
    bucketed_loss,
    cache_latents,
    nearest_bucket,
)


def test_buckets_keep_the_area_the_multiple_and_the_aspect_bound() -> None:
    buckets = aspect_buckets(256, 32)
    assert (256, 256) in buckets and (192, 320) in buckets and (320, 192) in buckets
    for w, h in buckets:
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 256 * 256 and max(w / h, h / w) <= 2.0
    assert set(buckets) == {(h, w) for w, h in buckets}  # portrait for every landscape
    assert nearest_bucket(1200, 1600, buckets) == (224, 288)  # 3:4
    assert nearest_bucket(1920, 1080, buckets) == (320, 192)  # 16:9 -> 5:3
    assert nearest_bucket(500, 500, buckets) == (256, 256)


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate(sizes):
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"garment {i}"}))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(root / "rotated.jpg", exif=exif.tobytes())
    rows.append(json.dumps({"file_name": "rotated.jpg", "text": "rotated"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_each_image_is_served_at_the_bucket_of_its_aspect(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data", [(300, 150), (150, 300), (200, 200), (90, 130)])
    images = ImageFolder.open(folder, 96, multiple=32)  # buckets (64, 128), (96, 96), (128, 64)
    assert images.sizes == ((128, 64), (64, 128), (96, 96), (64, 128), (64, 128))  # the JPEG after its EXIF turn
    for i in range(len(images)):
        w, h = images.size(i)
        assert images.image(i).shape == (h, w, 3)
    square = ImageFolder.open(folder, 96)
    assert all(square.image(i).shape == (96, 96, 3) for i in range(len(square)))


def test_a_mixed_batch_loss_is_the_mean_over_its_items() -> None:
    values = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0, 4: 16.0}
    size = {0: (1, 1), 1: (2, 1), 2: (1, 1), 3: (2, 1), 4: (3, 3)}.get
    calls: list[list[int]] = []

    def loss(group: list[int]) -> torch.Tensor:
        calls.append(group)
        return torch.tensor([values[i] for i in group]).mean()

    got = bucketed_loss([0, 1, 2, 3, 4], size, loss)
    assert float(got) == pytest.approx(np.mean(list(values.values())))
    assert calls == [[0, 2], [1, 3], [4]]  # one batch per size, in order of first appearance
    calls.clear()
    assert float(bucketed_loss([1, 3], size, loss)) == 5.0 and calls == [[1, 3]]  # one size: one call, unweighted


def test_cached_latents_of_several_sizes_batch_by_size(tmp_path: Path, tiny_components) -> None:
    folder = _folder(tmp_path / "data", [(300, 150), (150, 300), (200, 200)])
    images = ImageFolder.open(folder, 96, multiple=32)
    cached = cache_latents(images, tiny_components.vae, tiny_components.scaling_factor, progress=False)
    assert isinstance(cached.params, list) and len(cached) == 4
    assert [cached.size_of(i) for i in range(4)] == [(8, 16), (16, 8), (12, 12), (16, 8)]  # latent [h, w]
    g = torch.Generator().manual_seed(0)
    assert cached.latents([1, 3], g, torch.device("cpu")).shape[-2:] == (16, 8)
    assert isinstance(cached.subset([1, 3]), CachedLatents) and len(cached.subset([1, 3])) == 2


def test_finetune_and_embedding_train_on_mixed_aspects(tmp_path: Path, tiny_model_dir: Path) -> None:
    from r2r.training.embedding import EmbeddingConfig, train_negative_embedding
    from r2r.training.finetune import FinetuneConfig, finetune
    from r2r.training.loop import LoopConfig

    folder = _folder(tmp_path / "data", [(300, 150), (150, 300), (200, 200), (260, 120)])
    loop = LoopConfig(batch_size=4, max_steps=2, lr=1e-4, progress=False)
    result = finetune(FinetuneConfig(tiny_model_dir, folder, tmp_path / "ft", loop, resolution=96))
    assert result.completed and result.step == 2 and np.isfinite(result.last_loss)
    emb = train_negative_embedding(EmbeddingConfig(tiny_model_dir, folder, tmp_path / "emb", loop, resolution=96,
                                                   cache_latents=True))
    assert emb.completed and np.isfinite(emb.last_loss)
