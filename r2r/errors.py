"""r2r's own exception types: every error a user can act on derives from `R2RError`, and its message names the file
or flag and the fix (the same words the commands print)."""

from __future__ import annotations


class R2RError(Exception):
    """Base of r2r's errors (input files, models, bundles, flags, engines)."""


class FlagError(R2RError, ValueError):
    """A parameter (a command's flag, a `Translator` argument) that does not apply, or a bad value of one; the
    message names the flag."""


__all__ = ["FlagError", "R2RError"]
