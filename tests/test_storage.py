"""Inputs and outputs at fsspec URLs (r2r/storage.py): listed, read and written like local paths, bounded, atomic,
and `r2r-run` on URLs writes what it writes on paths. fsspec's in-memory filesystem stands in for a bucket."""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r import storage
from r2r.imageio import ImageReadError, collect_inputs, load_rgb, oriented_size, output_path_for, save_png
from r2r.runtime.outputs import is_complete, write_output


@pytest.fixture
def bucket() -> Iterator[str]:
    """A fresh memory:// root, removed after the test (the memory filesystem is one per process)."""
    fs, _ = storage.filesystem("memory://")
    root = f"/bucket-{secrets.token_hex(4)}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _png(rng: np.random.Generator, w: int, h: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_url_folders_globs_and_lists_expand_like_local_ones(bucket: str) -> None:
    fs, root = storage.filesystem(bucket)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "notes.md", "sub/c.png"):
        fs.pipe_file(f"{root}/renders/{name}", _png(rng, 64, 64))
    fs.pipe_file(f"{root}/list.txt", b"renders/b.png\n# a comment\n\nrenders/sub/c.png\n")
    folder = collect_inputs([f"{bucket}/renders/"])
    assert [storage.name_of(u) for u in folder] == ["a.jpg", "b.png"]  # sorted, images only, not recursive
    assert all(storage.is_url(u) for u in folder)
    assert [storage.name_of(u) for u in collect_inputs([f"{bucket}/renders/*.png"])] == ["b.png"]
    assert [storage.name_of(u) for u in collect_inputs([f"{bucket}/list.txt"])] == ["b.png", "c.png"]
    with pytest.raises(ImageReadError, match="no such file or folder"):
        collect_inputs([f"{bucket}/missing/"])
    with pytest.raises(ImageReadError, match=r"would both write b\.png"):
        fs.pipe_file(f"{root}/other/b.png", b"")
        collect_inputs([f"{bucket}/renders/b.png", f"{bucket}/other/b.png"])


def test_a_url_image_decodes_to_the_same_pixels_as_the_file(bucket: str, tmp_path: Path) -> None:
    data = _png(np.random.default_rng(1), 96, 80)
    (tmp_path / "r.png").write_bytes(data)
    fs, root = storage.filesystem(bucket)
    fs.pipe_file(f"{root}/r.png", data)
    assert np.array_equal(load_rgb(f"{bucket}/r.png"), load_rgb(tmp_path / "r.png"))
    assert oriented_size(f"{bucket}/r.png") == (96, 80)
    fs.pipe_file(f"{root}/bad.png", data[:-40])  # truncated: its CRCs fail
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        load_rgb(f"{bucket}/bad.png")
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        load_rgb(f"{bucket}/missing.png")


def test_a_url_past_the_byte_limit_is_refused_before_it_is_read(bucket: str) -> None:
    fs, root = storage.filesystem(bucket)
    fs.pipe_file(f"{root}/big.png", b"x" * 2048)
    with pytest.raises(ValueError, match="2048 bytes, more than the 1024"):
        storage.read_bytes(f"{bucket}/big.png", limit=1024)
    assert storage.read_bytes(f"{bucket}/big.png", limit=2048) == b"x" * 2048


def test_an_output_url_is_written_whole_with_no_temporary_left_and_counts_as_complete(bucket: str) -> None:
    out = output_path_for("renders/shirt.jpg", f"{bucket}/out")
    assert out == f"{bucket}/out/shirt.png"
    params = {"steps": 4}
    assert not is_complete(out, params)
    img = np.random.default_rng(2).integers(0, 255, (64, 72, 3), dtype=np.uint8)
    write_output(out, img, params, "shirt.jpg")
    fs, root = storage.filesystem(bucket)
    assert [storage.name_of(p) for p in fs.find(f"{root}/out")] == ["shirt.png"]  # the temporary was moved over it
    assert np.array_equal(load_rgb(out), img)
    assert is_complete(out, params) and not is_complete(out, {"steps": 5})
    save_png(f"{bucket}/out/half.png", img)
    fs.pipe_file(f"{root}/out/half.png", fs.cat_file(f"{root}/out/half.png")[:100])  # a truncated object
    assert not is_complete(f"{bucket}/out/half.png", {})


def test_a_url_without_its_filesystem_package_names_the_package() -> None:
    with pytest.raises(storage.StorageError, match="Protocol not known: nope"):
        storage.filesystem("nope://bucket/x.png")
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(ImageReadError, match="Install s3fs"):
        collect_inputs(["s3://bucket/renders/"])


def test_r2r_run_translates_urls_into_urls_as_it_translates_paths(tiny_bundle: Path, bucket: str,
                                                                   tmp_path: Path) -> None:
    from r2r.runtime.cli import main

    rng = np.random.default_rng(3)
    fs, root = storage.filesystem(bucket)
    (tmp_path / "in").mkdir()
    for name, (w, h) in (("shirt", (96, 96)), ("dress", (96, 64))):
        data = _png(rng, w, h)
        (tmp_path / "in" / f"{name}.png").write_bytes(data)
        fs.pipe_file(f"{root}/in/{name}.png", data)
    common = ["--engine", str(tiny_bundle), "--backend", "onnxruntime", "--steps", "4", "--strength", "0.5",
              "--threads", "1"]
    local = CliRunner().invoke(main, [*common, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(main, [*common, "--input", f"{bucket}/in/", "--output", f"{bucket}/out"])
    assert remote.exit_code == 0, remote.output
    assert "2 written" in remote.output
    for name in ("shirt", "dress"):
        assert np.array_equal(load_rgb(f"{bucket}/out/{name}.png"), load_rgb(tmp_path / "out" / f"{name}.png"))
    again = CliRunner().invoke(main, [*common, "--input", f"{bucket}/in/", "--output", f"{bucket}/out", "--resume"])
    assert "0 written, 2 skipped (complete)" in again.output, again.output
