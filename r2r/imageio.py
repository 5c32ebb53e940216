"""Image I/O shared by every stage: the preprocess of docs/design.md, PNG writing with text metadata.

Inputs are treated as hostile: only regular files are opened (a folder, a FIFO, a dangling link never is);
Pillow's decompression-bomb guard stays on (its warning band is an error too); what a format can verify is
verified before anything is decoded (every PNG chunk's CRC, so flipped bits are refused instead of decoded into a
garbled picture; truncated JPEG and WebP streams fail their decode); images below the smallest side the model can
run are refused; EXIF orientation is applied; written names are confined to the output folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from r2r.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Largest input accepted, in pixels (a 16k x 16k image); past it Pillow raises DecompressionBombError.
MAX_INPUT_PIXELS = 16384 * 16384
# Smallest side accepted: an f8 VAE and a UNet of three 2x downsamplings leave one latent cell per side at 64 px.
MIN_INPUT_SIDE = 64
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation


class ImageReadError(ValueError):
    """An input image that cannot be used; the message names the file and why."""


def load_rgb(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3], per the preprocess of docs/design.md ("The method").

    RGBA (and palette or LA images with transparency) are composited over white; 16-bit grey is scaled to 8 bits;
    EXIF orientation is applied; the result is resized with Pillow BICUBIC only if its size differs from
    `size` = (W, H).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: not a regular file")
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if min(im.size) < MIN_INPUT_SIDE:
                    raise ImageReadError(f"{p}: {im.size[0]}x{im.size[1]} pixels; the smallest side r2r takes is "
                                         f"{MIN_INPUT_SIDE}")
                if im.format == "PNG":
                    im.verify()  # every chunk's CRC; a verified image must be opened again to be decoded
            with Image.open(p) as im:
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


def oriented_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """An image's (W, H) after its EXIF orientation, from its header alone (nothing decoded)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: not a regular file")
    try:
        with Image.open(p) as im:
            w, h = im.size
            rotated = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # the transposing orientations
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from exc
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


def save_png(path: str | os.PathLike[str], rgb: np.ndarray, text: Mapping[str, str] | None = None) -> Path:
    """Write a PNG atomically, so a killed run never leaves half a file."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(fh, format="PNG", pnginfo=info)
    return Path(path)


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})


def output_path_for(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir/<input stem>.png`, refusing any name that would leave `out_dir`."""
    out = Path(out_dir).resolve()
    stem = Path(input_path).stem
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem or "\x00" in stem:
        raise ImageReadError(f"{input_path}: unusable file name for an output")
    target = (out / f"{stem}.png").resolve()
    if target.parent != out:
        raise ImageReadError(f"{input_path}: output name escapes {out}")
    return target


def collect_inputs(specs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted), globs and .txt lists of paths into image paths.

    Two inputs with the same stem would write the same output, so that is refused up front.
    """
    import glob

    found: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file() and p.suffix.lower() == ".txt":
            base = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
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
    seen: dict[str, Path] = {}
    for q in found:
        if q.stem in seen and seen[q.stem].resolve() != q.resolve():
            raise ImageReadError(f"{q} and {seen[q.stem]} would both write {q.stem}.png; rename one")
        seen[q.stem] = q
    return list(dict.fromkeys(found))
