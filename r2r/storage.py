"""Where `r2r-run` reads inputs and writes outputs: local paths, or fsspec URLs (`s3://`, `gs://`, `az://`, ...).

A URL is read and written through fsspec's filesystem for its protocol, which the user installs (`s3fs`,
`gcsfs`, `adlfs`); a missing one is an error that names the package. Local paths stay `Path`s and never go
through fsspec. What is true for local files holds for URLs too:
- an input is hostile: at most `MAX_INPUT_BYTES` are read, and a name that would leave the output folder is refused
  (`r2r.imageio.output_path_for`);
- nothing is half-written: on an object store (S3, GCS, Azure) one PUT creates the whole object or nothing, so an
  output is put directly; on any other filesystem it is written to a hidden temporary sibling (`TEMP_GLOB`) and
  moved over its name.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path, PurePosixPath
from typing import IO, Any

from r2r.errors import R2RError

# One location of an input or an output: a local path, or a URL kept as text (Path would fold its '//').
Location = Path | str

# A hostile URL could name a file of any size; no image r2r takes (16k x 16k, MAX_INPUT_PIXELS) needs more.
MAX_INPUT_BYTES = 1 << 30
# Filesystems whose single write is atomic (an object appears whole or not at all): no temporary needed there.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class StorageError(R2RError, OSError):
    """A URL that cannot be used (unknown protocol, filesystem package missing); the message says the fix."""


def is_url(loc: object) -> bool:
    return isinstance(loc, str) and _URL.match(loc) is not None


def location(text: str | os.PathLike[str]) -> Location:
    """A user's `--output` or input: a URL stays text, anything else is a local path."""
    return text if is_url(text) else Path(text)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise StorageError(f"{url}: URLs need fsspec: pip install fsspec") from exc
    try:
        return url_to_fs(url)
    except ImportError as exc:  # fsspec knows the protocol; its package is not installed
        raise StorageError(f"{url}: {exc} (its fsspec filesystem package)") from exc
    except ValueError as exc:
        raise StorageError(f"{url}: {exc}") from exc


def name_of(loc: Location) -> str:
    """The last component of a location (`a/b.png` -> `b.png`), the same for a path and a URL."""
    return loc.name if isinstance(loc, Path) else PurePosixPath(filesystem(loc)[1]).name


def child(folder: Location, name: str) -> Location:
    """`folder/name`; the caller has checked that `name` is one component."""
    return folder / name if isinstance(folder, Path) else folder.rstrip("/") + "/" + name


def is_file(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_file()
    fs, path = filesystem(loc)
    return bool(fs.isfile(path))


def make_dirs(folder: Location) -> None:
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
        return
    fs, path = filesystem(folder)
    fs.makedirs(path, exist_ok=True)  # a no-op on object stores, where folders are prefixes


def read_bytes(url: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A URL's whole content, refused past `limit` bytes before anything is read."""
    fs, path = filesystem(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{url}: no such file")
    size = fs.size(path)
    if size is not None and size > limit:
        raise ValueError(f"{url}: {size} bytes, more than the {limit} an input may have")
    data = fs.cat_file(path)
    if len(data) > limit:
        raise ValueError(f"{url}: more than the {limit} bytes an input may have")
    return bytes(data)


def open_url(url: str) -> IO[bytes]:
    """A seekable reader of a URL (for a header: only what is read is fetched)."""
    fs, path = filesystem(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{url}: no such file")
    return fs.open(path, "rb")


def write_bytes(url: str, data: bytes) -> str:
    """Write a URL's whole content so that readers see the old object or the new one, never part of it."""
    fs, path = filesystem(url)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & OBJECT_STORES:
        fs.pipe_file(path, data)
        return url
    parent, name = PurePosixPath(path).parent, PurePosixPath(path).name
    tmp = str(parent / f".{name}.tmp-{secrets.token_hex(4)}")
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise
    return url


def list_inputs(spec: str, suffixes: tuple[str, ...]) -> list[str]:
    """The image URLs a URL spec names: a file, a folder's images (sorted, not recursive: as for a local folder),
    a glob, or a .txt list (one URL or path relative to the list's folder per line)."""
    fs, path = filesystem(spec)
    url = fs.unstrip_protocol
    if any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"{spec}: the pattern matches no file")
        return [url(m) for m in matches if PurePosixPath(m).suffix.lower() in suffixes and fs.isfile(m)]
    if fs.isdir(path):
        files = sorted(fs.find(path, maxdepth=1))
        return [url(f) for f in files if PurePosixPath(f).suffix.lower() in suffixes]
    if not fs.isfile(path):
        raise FileNotFoundError(f"{spec}: no such file or folder")
    if PurePosixPath(path).suffix.lower() == ".txt":
        base = PurePosixPath(path).parent
        found = []
        for line in read_bytes(spec).decode("utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line if is_url(line) else url(str(base / line)))
        return found
    return [url(path)]


__all__ = ["MAX_INPUT_BYTES", "OBJECT_STORES", "Location", "StorageError", "child", "filesystem", "is_file",
           "is_url", "list_inputs", "location", "make_dirs", "name_of", "open_url", "read_bytes", "write_bytes"]
