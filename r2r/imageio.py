"""Image I/O shared by every stage: the preprocess of docs/design.md, PNG writing with text metadata.

Inputs are local paths or fsspec URLs (`r2r.storage`). They are treated as hostile: only regular files are opened
(a folder, a FIFO, a dangling link never is; a URL is read whole up to `storage.MAX_INPUT_BYTES`);
Pillow's decompression-bomb guard stays on (its warning band is an error too); what a format can verify is
verified before anything is decoded (every PNG chunk's CRC, so flipped bits are refused instead of decoded into a
garbled picture; truncated JPEG and WebP streams fail their decode); images below the smallest side the model can
run are refused; EXIF orientation is applied; written names are confined to the output folder.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from r2r import storage
from r2r.atomic import atomic_path
from r2r.errors import R2RError
from r2r.storage import Location

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Largest input accepted, in pixels (a 16k x 16k image); past it Pillow raises DecompressionBombError.
MAX_INPUT_PIXELS = 16384 * 16384
# Smallest side accepted: an f8 VAE and a UNet of three 2x downsamplings leave one latent cell per side at 64 px.
MIN_INPUT_SIDE = 64
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation


class ImageReadError(R2RError, ValueError):
    """An input image that cannot be used; the message names the file and why."""


def _local(src: os.PathLike[str] | str) -> Path:
    p = Path(src)
    if not p.is_file():
        raise ImageReadError(f"{p}: not a regular file")
    return p


def _source(src: Location | os.PathLike[str]) -> Path | io.BytesIO:
    """What Pillow opens: a local regular file's path, or a URL's bytes (read once, bounded)."""
    if not storage.is_url(src):
        return _local(src)
    try:
        return io.BytesIO(storage.read_bytes(str(src)))
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{src}: cannot read ({exc})") from exc


def _rewound(source: Path | io.BytesIO) -> Path | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


def load_rgb(path: Location | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image (a path or a URL) as uint8 RGB [H, W, 3], per the preprocess of docs/design.md ("The method").

    RGBA (and palette or LA images with transparency) are composited over white; 16-bit grey is scaled to 8 bits;
    EXIF orientation is applied; the result is resized with Pillow BICUBIC only if its size differs from
    `size` = (W, H).
    """
    return _decode(_source(path), path if storage.is_url(path) else Path(path), size)


def decode_rgb(data: bytes, name: str, max_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    """An image received as bytes (a request's body), read as `load_rgb` reads a file; `max_pixels`: the largest
    image accepted (checked from the header, before anything is decoded)."""
    return _decode(io.BytesIO(data), name, None, max_pixels)


def _decode(source: Path | io.BytesIO, p: Location | os.PathLike[str], size: tuple[int, int] | None,
            max_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if min(im.size) < MIN_INPUT_SIDE:
                    raise ImageReadError(f"{p}: {im.size[0]}x{im.size[1]} pixels; the smallest side r2r takes is "
                                         f"{MIN_INPUT_SIDE}")
                if im.size[0] * im.size[1] > max_pixels:
                    raise ImageReadError(f"{p}: {im.size[0]}x{im.size[1]} pixels; the largest image taken here is "
                                         f"{max_pixels} pixels")
                if im.format == "PNG":
                    im.verify()  # every chunk's CRC; a verified image must be opened again to be decoded
            with Image.open(_rewound(source)) as im:
                im.load()
                img = _to_rgb(ImageOps.exif_transpose(im) or im)
    except ImageReadError:
        raise
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, ValueError, SyntaxError,
            EOFError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from exc
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


@contextmanager
def _header(src: Location | os.PathLike[str]) -> Iterator[Path | IO[bytes]]:
    """A local path, or a lazy reader of a URL (a header needs its first bytes only)."""
    if not storage.is_url(src):
        yield _local(src)
        return
    try:
        fh = storage.open_url(str(src))
    except OSError as exc:
        raise ImageReadError(f"{src}: cannot read ({exc})") from exc
    with fh:
        yield fh


def oriented_size(path: Location | os.PathLike[str]) -> tuple[int, int]:
    """An image's (W, H) after its EXIF orientation, from its header alone (nothing decoded)."""
    try:
        with _header(path) as source, Image.open(source) as im:
            w, h = im.size
            rotated = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # the transposing orientations
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from exc
    return (h, w) if rotated else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey: Pillow's convert would clip it to white
        grey = np.asarray(im, dtype=np.int64)
        top = 65535 if im.mode.startswith("I;16") or grey.max() > 255 else 255
        return Image.fromarray(np.clip(grey * 255 // top, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (`pixels / 127.5 - 1`), C-contiguous.

    Contiguous NCHW on purpose: a channels-last view makes PyTorch pick other convolution kernels,
    whose sums differ in the last bits from the ONNX graphs' NCHW ones.
    """
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    return chw / np.float32(127.5) - np.float32(1.0)


def from_model_output(x: np.ndarray) -> np.ndarray:
    """Decoder output in [0, 1], [3, H, W] -> uint8 [H, W, 3] (`clamp(0, 1) * 255`, rounded)."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


def save_png(path: Location | os.PathLike[str], rgb: np.ndarray, text: Mapping[str, str] | None = None
             ) -> Location:
    """Write a PNG atomically (a local path or a URL), so a killed run never leaves half a file."""
    if storage.is_url(path):
        return storage.write_bytes(str(path), png_bytes(rgb, text))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(png_bytes(rgb, text))
    return Path(path)


def png_bytes(rgb: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """uint8 RGB [H, W, 3] as a PNG file's bytes, with `text` chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def output_path_for(input_path: Location | os.PathLike[str], out_dir: Location | os.PathLike[str]) -> Location:
    """`out_dir/<input stem>.png` (a path, or a URL where `out_dir` is one), refusing any name that would leave
    `out_dir`."""
    stem = PurePosixPath(str(input_path)).stem if storage.is_url(input_path) else Path(input_path).stem
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem or "\x00" in stem:
        raise ImageReadError(f"{input_path}: unusable file name for an output")
    if storage.is_url(out_dir):
        return storage.child(str(out_dir), f"{stem}.png")
    out = Path(out_dir).resolve()
    target = (out / f"{stem}.png").resolve()
    if target.parent != out:
        raise ImageReadError(f"{input_path}: output name escapes {out}")
    return target


def collect_inputs(specs: list[str]) -> list[Location]:
    """Expand files, folders (their images, sorted), globs and .txt lists of paths into image paths; a URL spec
    (`s3://bucket/renders/`, `gs://b/*.png`, ...) into image URLs the same way (`storage.list_inputs`).

    Two inputs with the same stem would write the same output, so that is refused up front.
    """
    import glob

    found: list[Location] = []
    for spec in specs:
        if storage.is_url(spec):
            try:
                found.extend(storage.list_inputs(spec, IMAGE_SUFFIXES))
            except (OSError, ValueError) as exc:
                raise ImageReadError(str(exc)) from exc
            continue
        p = Path(spec)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file() and p.suffix.lower() == ".txt":
            base = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    if storage.is_url(line):
                        found.append(line)
                        continue
                    q = Path(line)
                    found.append(q if q.is_absolute() else base / q)
        elif p.is_file():
            found.append(p)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            found.extend(m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise ImageReadError(f"{spec}: the pattern matches no file")
        else:
            raise ImageReadError(f"{spec}: no such file or folder")
    seen: dict[str, Location] = {}
    for q in found:
        stem = PurePosixPath(storage.name_of(q)).stem
        if stem in seen and not _same(seen[stem], q):
            raise ImageReadError(f"{q} and {seen[stem]} would both write {stem}.png; rename one")
        seen[stem] = q
    return list(dict.fromkeys(found))


def _same(a: Location, b: Location) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a == b
