"""Refit: another model's weights into a bundle's ONNX graphs without exporting them again.

The exporter writes each parameter of a graph's module as an initializer under one of these forms: its own name
(`unet.<param>`), a renamed or reshaped copy, or a transposed copy (a Linear's weight as a MatMul operand); the rest
are small constants of the graph itself. `weight_map` finds, by content, which parameter (and form) each initializer is,
against the module the graph was exported from; `refit_graph` writes the initializers of that map from a module of
the same architecture and replaces the graph's folder atomically. Measured on the embedded default's UNet graphs:
194 initializers by name, 60 renamed, 70 transposed, none ambiguous.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from r2r.atomic import atomic_dir

SMALL = 64  # initializers below this many elements that match no parameter are the graph's own constants


class RefitError(ValueError):
    """A graph and a module that do not correspond (another architecture, an ambiguous weight)."""


def _content(a: np.ndarray) -> str:
    """The values, not the shape: the exporter also writes reshaped copies (a norm's [C] weight as [C, 1, 1])."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + a.tobytes()).hexdigest()


def weight_map(graph: Path, params: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (parameter name, transposed) for the graph at `graph`, exported from `params`."""
    import onnx
    from onnx import numpy_helper

    index: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for name, value in params.items():
        index[_content(value)].append((name, False))
        if value.ndim == 2:
            index[_content(value.T)].append((name, True))
    found: dict[str, tuple[str, bool]] = {}
    for init in onnx.load(str(graph)).graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name in params and _content(params[init.name]) == _content(value):
            found[init.name] = (init.name, False)
            continue
        hits = index.get(_content(value), [])
        if len({(n, t) for n, t in hits}) > 1:
            # equal parameters (e.g. zero-initialised ones) cannot be told apart by content
            raise RefitError(f"{graph}: initializer {init.name} equals {len(hits)} parameters "
                             f"({', '.join(n for n, _ in hits[:3])}); this bundle cannot be refitted")
        if hits:
            found[init.name] = hits[0]
        elif value.size >= SMALL:
            raise RefitError(f"{graph}: initializer {init.name} {value.shape} matches no parameter of the model")
    return found


def refit_graph(graph: Path, mapping: dict[str, tuple[str, bool]], params: dict[str, np.ndarray]) -> Path:
    """Rewrite the graph at `graph` with `params` (same architecture) through `mapping`; its folder (graph and
    external data) is replaced whole, atomically."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    for init in model.graph.initializer:
        if init.name not in mapping:
            continue
        name, transposed = mapping[init.name]
        if name not in params:
            raise RefitError(f"{graph}: the new model has no parameter {name}")
        value = params[name].T if transposed else params[name]
        if value.size == int(np.prod(init.dims)) and value.ndim != len(init.dims):
            value = value.reshape(tuple(init.dims))  # a reshaped copy
        if tuple(value.shape) != tuple(init.dims):
            raise RefitError(f"{graph}: {name} is {tuple(value.shape)} in the new model, {tuple(init.dims)} in the "
                             "bundle: another architecture; export a new bundle")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(
            onnx.helper.tensor_dtype_to_np_dtype(init.data_type))), init.name))
    data = sorted(p.name for p in graph.parent.iterdir() if p.suffix == ".data")
    with atomic_dir(graph.parent) as tmp:
        onnx.save_model(model, str(tmp / graph.name), save_as_external_data=bool(data),
                        all_tensors_to_one_file=True, location=data[0] if data else None)
    return graph


__all__ = ["RefitError", "refit_graph", "weight_map"]
