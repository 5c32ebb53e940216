"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

Every stage writes through these two helpers. The new content goes to a hidden sibling (same folder,
so `os.replace` is a rename on one filesystem), is flushed and fsynced, then renamed over the target;
on any failure the temporary is removed and the previous content, if any, stays. A process killed
mid-write leaves at most a hidden temporary (`TEMP_GLOB`), never a truncated file under the real name.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What a temporary of this module looks like, for tests and for clean-ups of killed runs.
TEMP_GLOB = ".*.tmp-*"


def temp_sibling(path: Path) -> Path:
    """A hidden, unique name next to `path` that matches TEMP_GLOB."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; some filesystems refuse it on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (any writer: open, safetensors, onnx, PIL).

    On success it replaces `path`; on failure it is removed. The file gets the usual permissions of a
    newly created file (umask applies).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{final}: nothing was written")
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(final.parent)


def atomic_write(path: str | os.PathLike[str], data: Any) -> Path:
    """Write a bytes-like object (bytes, a TensorRT IHostMemory, ...) or UTF-8 text to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else memoryview(data))
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden folder to fill; on success it replaces the folder `path` (an old one is moved
    aside first and deleted after), on failure it is removed. Readers never see a half-filled folder."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["TEMP_GLOB", "atomic_dir", "atomic_path", "atomic_write", "temp_sibling"]
