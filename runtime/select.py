"""Choosing a backend, device and precision for a bundle from the backend table (`r2r/backends.py`), and the
bundles `r2r-run` exports into its cache when it is given a model instead of a bundle."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from r2r import graph_io
from r2r.backends import BackendRow, auto_choices, backend_row
from r2r.cache import cache_dir
from r2r.errors import R2RError
from r2r.log import log
from r2r.manifest import MANIFEST
from r2r.models import sha256_file, sha256_tree
from r2r.runtime.bundle_reader import Bundle


class DeviceUnavailable(R2RError, ImportError):
    """A device was asked for that the backend cannot use on this machine; the message names the install."""


def runtime_module(row: BackendRow) -> ModuleType:
    """The row's runtime module: `open_backend(bundle, device, precision, threads)`."""
    return importlib.import_module(row.runtime)


def has_engines(bundle: Bundle, row: BackendRow) -> bool:
    return any(e.backend == row.name for e in bundle.manifest.engines.values())


def resolve_device(row: BackendRow, device: str = "auto") -> str:
    """The device `row` runs on: the first of its devices usable here for "auto", else the one asked for, checked."""
    if device != "auto":
        row.check_device(device)
    available = row.available()
    if device == "auto":
        for d in row.devices:
            if d in available:
                return d
        raise DeviceUnavailable(f"the {row.name} backend has no usable device on this machine: {row.install}")
    if device not in available:
        raise DeviceUnavailable(f"--device {device}: the {row.name} backend cannot use it on this machine: "
                                f"{row.install}")
    return device


def backend_candidates(name: str, bundle: Bundle, device: str = "auto",
                       eligible: Callable[[BackendRow], bool] = lambda row: True) -> list[tuple[BackendRow, str]]:
    """A named row on its device, or for "auto" every (backend, device) of the table's auto order that can run this
    bundle here, fastest first (TensorRT only where the bundle has engines; `eligible` may rule rows out)."""
    if name != "auto":
        row = backend_row(name)
        return [(row, resolve_device(row, device))]
    return [(row, d) for row, d in auto_choices(device)
            if eligible(row) and (not row.needs_engines or has_engines(bundle, row))]


def resolve_precision(row: BackendRow, bundle: Bundle, precision: str | None = None, device: str = "cpu") -> str:
    """The precision asked for (checked against the row); else, for engines built per GPU, the best precision the
    bundle has engines of; else the best precision this CPU runs natively."""
    if precision is not None:
        return row.check_precision(precision)
    if row.needs_engines:
        built = {e.precision for e in bundle.manifest.engines.values() if e.backend == row.name}
        return next((p for p in row.precisions if p in built), row.precisions[0])
    return row.native_precision(device=device)


def cached_bundle(model: Path, embedding: Path, width: int, height: int, batch_max: int, tac_divisor: int,
                  progress: Callable[[str], None] = log, graphs: Sequence[str] = graph_io.DEFAULT_GRAPHS,
                  attention_pool: int = 1) -> Path:
    """A model's bundle, exported once into the cache and named by what it is made from (a later call with the same
    model, embedding and settings checks hashes only). `graphs`: the ones the run calls, exported alone unless a
    bundle of every default graph is in the cache already (it serves any run without step caching); none: the
    manifest and conditioning alone, for a backend that runs the model's own modules; the step-cache pair: a bundle
    of the graphs given, named "-stepcache". `attention_pool`: the UNet graphs' (docs/design.md, "Less work
    per image"), a bundle of its own."""
    from r2r.export.bundle_writer import ExportConfig, export_bundle

    digest = hashlib.sha256(f"{sha256_tree(model)} {sha256_file(embedding)}".encode()).hexdigest()[:12]
    name = f"{model.name}-{digest}-{width}x{height}-b{batch_max}-d{tac_divisor}" \
        + (f"-p{attention_pool}" if attention_pool != 1 else "")
    wanted = tuple(g for g in graph_io.ALL_GRAPHS if g in graphs)
    full = cache_dir() / "bundles" / name
    if not wanted:
        name += "-nographs"
    elif any(g in graph_io.STEP_CACHE_GRAPHS for g in wanted):  # a step-caching program: its graphs, in a folder
        name += "-stepcache"                                      # of their own
    elif wanted != graph_io.DEFAULT_GRAPHS and not (full / MANIFEST).is_file():
        name += "-without-" + "-".join(g for g in graph_io.DEFAULT_GRAPHS if g not in wanted)
    else:
        wanted = graph_io.DEFAULT_GRAPHS
    out = cache_dir() / "bundles" / name
    progress(f"r2r-run: using the bundle of {model.name} at {width}x{height} in {out}")
    # the same model's other bundles (another pool, step caching, fewer graphs) give the graphs they share
    same = f"{model.name}-{digest}-"
    siblings = out.parent.iterdir() if out.parent.is_dir() else ()
    donors = tuple(sorted(p for p in siblings if p.name.startswith(same) and p.name != name))
    export_bundle(ExportConfig(model, embedding, out, width, height, batch_max, tac_divisor, wanted,
                               attention_pool=attention_pool, donors=donors), progress=progress)
    return out


__all__ = ["DeviceUnavailable", "backend_candidates", "cache_dir", "cached_bundle", "has_engines", "resolve_device",
           "resolve_precision", "runtime_module"]
