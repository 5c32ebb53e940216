"""Progress messages of every command: one line each on stderr, flushed (stdout stays for data)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["log"]
