"""Every input file is hostile: a corpus of broken, odd and valid files, each with the outcome it must have.

Valid inputs of every mode and container decode to RGB at their own (EXIF-oriented) size; what a format can verify
is verified (PNG chunk CRCs: flipped bits are refused, not decoded into a garbled picture); truncated streams, empty
files, headers alone, decompression bombs, text with an image's name and images below the smallest side are refused
with the file named; folders, FIFOs and dangling links are never opened.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2r.imageio import MIN_INPUT_SIDE, ImageReadError, collect_inputs, load_rgb

W, H = 256, 192


def _picture(w: int = W, h: int = H) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 64) * 4], -1).astype(np.uint8)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _idat_span(png: bytes) -> tuple[int, int]:
    """Where the first IDAT chunk's data lies in a PNG file."""
    i = png.index(b"IDAT")
    length = struct.unpack(">I", png[i - 4:i])[0]
    return i + 4, i + 4 + length


VALID: dict[str, tuple[int, int]] = {}  # name -> (W, H) the decoded image must have


def _write_valid(folder: Path) -> None:
    rgb = Image.fromarray(_picture())
    rgb.save(folder / "plain.png")
    rgb.save(folder / "robe d'été n°1.png")  # spaces, apostrophe and non-ASCII in the name
    Image.fromarray(np.dstack([_picture(), np.full((H, W), 128, np.uint8)]), "RGBA").save(folder / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    rgb.convert("LA").save(folder / "grey-alpha.png")
    grey16 = (np.mgrid[:H, :W][1] * 65535 // W).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees; the decoded image is upright, so H x W
    rgb.save(folder / "rotated.jpg", exif=exif, quality=95)
    rgb.save(folder / "jpeg-named.png", format="JPEG", quality=95)  # the content decides, not the name
    rgb.save(folder / "photo.webp", quality=90)
    VALID.update({n: (W, H) for n in ("plain.png", "robe d'été n°1.png", "alpha.png", "palette.png",
                                       "grey-alpha.png", "grey16.png", "cmyk.jpg", "jpeg-named.png",
                                       "photo.webp")})
    VALID["rotated.jpg"] = (H, W)


def _write_broken(folder: Path) -> dict[str, str]:
    """name -> a word the refusal must contain."""
    png = _png_bytes(Image.fromarray(_picture()))
    start, end = _idat_span(png)
    broken = {}
    (folder / "truncated-png.png").write_bytes(png[: (start + end) // 2])
    broken["truncated-png.png"] = "cannot read"
    (folder / "empty.png").write_bytes(b"")
    broken["empty.png"] = "cannot read"
    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    (folder / "header-only.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
    broken["header-only.png"] = "cannot read"
    bomb = struct.pack(">IIBBBBB", 60000, 60000, 1, 0, 0, 0, 0)  # 3.6 G pixels in a few hundred bytes
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", bomb) +
                                      _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b""))
    broken["bomb.png"] = "cannot read"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one-pixel.png")
    broken["one-pixel.png"] = f"smallest side r2r takes is {MIN_INPUT_SIDE}"
    jpeg = io.BytesIO()
    Image.fromarray(_picture()).save(jpeg, format="JPEG", quality=95)
    (folder / "truncated-jpeg.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    broken["truncated-jpeg.jpg"] = "cannot read"
    webp = io.BytesIO()
    Image.fromarray(_picture()).save(webp, format="WEBP", quality=90)
    (folder / "truncated-webp.webp").write_bytes(webp.getvalue()[: len(webp.getvalue()) // 2])
    broken["truncated-webp.webp"] = "cannot read"
    (folder / "notes.png").write_text("not an image at all\n")
    broken["notes.png"] = "cannot read"
    return broken


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    _write_valid(folder)
    broken = _write_broken(folder)
    (folder / "a-folder.png").mkdir()
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    os.mkfifo(folder / "pipe.png")
    return folder, broken


def test_every_valid_input_decodes_to_rgb_at_its_own_oriented_size(corpus) -> None:
    folder, _ = corpus
    for name, (w, h) in VALID.items():
        img = load_rgb(folder / name)
        assert img.dtype == np.uint8 and img.shape == (h, w, 3), name
    grey = load_rgb(folder / "grey16.png")
    assert grey[:, 0].max() < 8 and grey[:, -1].min() > 240  # a ramp, not clipped to white
    assert (load_rgb(folder / "alpha.png") > 0).all()  # composited over white, not black


@pytest.mark.parametrize("name", ["truncated-png.png", "empty.png", "header-only.png", "bomb.png", "one-pixel.png",
                                  "truncated-jpeg.jpg", "truncated-webp.webp", "notes.png"])
def test_each_broken_input_is_refused_with_its_name_and_why(corpus, name: str) -> None:
    folder, broken = corpus
    with pytest.raises(ImageReadError) as err:
        load_rgb(folder / name)
    assert name in str(err.value) and broken[name] in str(err.value)


def test_every_flipped_byte_in_png_image_data_is_refused_not_decoded(tmp_path: Path) -> None:
    """60 PNGs with one byte of their image data flipped: the chunk CRC no longer matches, so none decodes."""
    png = _png_bytes(Image.fromarray(_picture()))
    start, end = _idat_span(png)
    rng = np.random.default_rng(0)
    refused = 0
    for k, at in enumerate(rng.integers(start, end, 60)):
        bad = bytearray(png)
        bad[at] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip-{k}.png"
        path.write_bytes(bytes(bad))
        try:
            load_rgb(path)
        except ImageReadError as exc:
            refused += "CRC" in str(exc) or "cannot read" in str(exc)
        finally:
            path.unlink()
    assert refused == 60


def test_folders_fifos_and_dangling_links_are_never_opened(corpus) -> None:
    folder, _ = corpus
    found = {p.name for p in collect_inputs([str(folder)])}
    assert not {"a-folder.png", "dangling.png", "pipe.png"} & found  # a FIFO opened for reading would hang here
    for name in ("a-folder.png", "dangling.png", "pipe.png"):
        with pytest.raises(ImageReadError, match="not a regular file"):
            load_rgb(folder / name)


def test_r2r_run_translates_each_valid_file_at_its_size_and_refuses_each_broken_one_by_name(
        corpus, default_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole corpus through `r2r-run`: every valid input written at its own size, a per-file error naming each
    broken one, nothing else in the output folder (no partial file), and no hang on the FIFO."""
    from click.testing import CliRunner

    from r2r.runtime.cli import main

    folder, broken = corpus
    cache = tmp_path / "cache"
    shutil.copytree(default_bundle, cache / "bundles" / default_bundle.name)
    monkeypatch.setenv("R2R_CACHE", str(cache))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--input", str(folder), "--output", str(out), "--backend", "onnxruntime",
                                    "--steps", "4", "--batch-size", "2"])
    assert res.exit_code == 1, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(n).stem}.png" for n in VALID)
    for name, (w, h) in VALID.items():
        with Image.open(out / f"{Path(name).stem}.png") as im:
            assert im.size == (w, h), name
    failed = [line for line in res.output.splitlines() if "failed: " in line]
    assert len(failed) == len(broken)
    for name in broken:
        assert any(name in line and broken[name] in line for line in failed), name
