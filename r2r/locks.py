"""One writer per bundle across processes: Ray actors, jobs and users on one node may open or build the same
bundle at once (docs/design.md, "The bundle").

Every writer of a bundle (the export, each engine builder) holds the bundle's lock, a file inside the bundle folder,
for the whole of its read-modify-write of the files and the manifest; a second writer waits for it, saying so, and
then finds the work done (its keys match: "up to date"). Readers take no lock: every file appears whole (r2r.atomic)
and the manifest is replaced last. The lock is an OS file lock (the `filelock` package): a killed holder releases
it, and it is reentrant within a process, so a builder may call another.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from r2r.log import log

LOCK_FILE = ".r2r-writer.lock"

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def bundle_lock(bundle: str | os.PathLike[str], progress: Callable[[str], None] = log) -> Iterator[None]:
    """Hold `bundle`'s writer lock (creating the folder if needed); wait for another holder, saying so."""
    folder = Path(bundle)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), is_singleton=True)  # one object per path: reentrant in a process
    try:
        lock.acquire(blocking=False)  # one try: timeout=0 may poll once more before giving up
    except Timeout:
        progress(f"r2r: another process is writing {folder}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def writes_bundle(fn: F) -> F:
    """Decorator for `fn(bundle, ...)`: it runs holding the bundle's writer lock."""

    @functools.wraps(fn)
    def wrapper(bundle: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        with bundle_lock(bundle, kwargs.get("progress") or log):
            return fn(bundle, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


__all__ = ["LOCK_FILE", "bundle_lock", "writes_bundle"]
