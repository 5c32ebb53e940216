"""Which model parameter each initializer of an ONNX graph is, and a graph's weights rewritten from another model.

The exporter writes each parameter of a graph's module as an initializer under one of these forms: its own name
(`unet.<param>`), a renamed or reshaped copy, or a transposed copy (a Linear's weight as a MatMul operand); the rest
are small constants of the graph itself. `weight_map` finds, by content, which parameter (and form) each initializer is,
against the module the graph was exported from; `refit_graph` writes the initializers of that map from a module of
the same architecture and replaces the graph's folder atomically. Measured on the embedded default's UNet graphs:
194 initializers by name, 60 renamed, 70 transposed, none ambiguous. A map is saved beside the bundle's graphs
(docs/design.md, "Refit"), because it can only be made while the bundle's own model is at hand.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from r2r.atomic import atomic_dir, atomic_write

SMALL = 64  # initializers below this many elements that match no parameter are the graph's own constants
MAP_FORMAT = 1

WeightMap = dict[str, tuple[str, bool]]  # initializer name -> (parameter name, transposed)


class RefitError(ValueError):
    """A graph and a module that do not correspond (another architecture, an ambiguous weight)."""


def _content(a: np.ndarray) -> str:
    """The values, not the shape: the exporter also writes reshaped copies (a norm's [C] weight as [C, 1, 1])."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + a.tobytes()).hexdigest()


class ParamIndex:
    """A model part's parameters by content (as they are and, for matrices, transposed): built once, asked for
    every graph that holds the part."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = params
        self.by_content: dict[str, list[tuple[str, bool]]] = defaultdict(list)
        for name, value in params.items():
            self.by_content[_content(value)].append((name, False))
            if value.ndim == 2:
                self.by_content[_content(value.T)].append((name, True))


def weight_map(graph: Path, params: dict[str, np.ndarray] | ParamIndex) -> WeightMap:
    """Initializer name -> (parameter name, transposed) for the graph at `graph`, exported from `params`."""
    import onnx
    from onnx import numpy_helper

    index = params if isinstance(params, ParamIndex) else ParamIndex(params)
    found: WeightMap = {}
    for init in onnx.load(str(graph)).graph.initializer:
        value = numpy_helper.to_array(init)
        own = index.params.get(init.name)
        if own is not None and _content(own) == _content(value):
            found[init.name] = (init.name, False)
            continue
        hits = index.by_content.get(_content(value), [])
        if len(set(hits)) > 1:
            # equal parameters (e.g. zero-initialised ones) cannot be told apart by content
            raise RefitError(f"{graph}: initializer {init.name} equals {len(hits)} parameters "
                             f"({', '.join(n for n, _ in hits[:3])}); this bundle cannot be refitted")
        if hits:
            found[init.name] = hits[0]
        elif value.size >= SMALL:
            raise RefitError(f"{graph}: initializer {init.name} {value.shape} matches no parameter of the model")
    return found


def write_map(path: Path, graph: str, part: str, mapping: WeightMap) -> Path:
    """Save a graph's weight map (JSON, atomically)."""
    body = {"format": MAP_FORMAT, "graph": graph, "part": part,
            "initializers": {k: [n, t] for k, (n, t) in sorted(mapping.items())}}
    return atomic_write(path, json.dumps(body, indent=1, sort_keys=True) + "\n")


def read_map(path: Path, graph: str, part: str) -> WeightMap:
    """A saved weight map, checked for what it must be (the bundle's files are hostile until proven otherwise)."""
    try:
        body = json.loads(path.read_bytes())
        items = body["initializers"].items()
        ok = (body["format"] == MAP_FORMAT and body["graph"] == graph and body["part"] == part
              and all(isinstance(k, str) and isinstance(n, str) and n.startswith(f"{part}.") and isinstance(t, bool)
                      for k, (n, t) in items))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RefitError(f"{path}: not a weight map ({exc}); record it again with `r2r-export onnx --refit`") from exc
    if not ok:
        raise RefitError(f"{path}: not a weight map of the {graph} graph; record it again with "
                         "`r2r-export onnx --refit`")
    return {k: (n, t) for k, (n, t) in items}


def refit_graph(graph: Path, mapping: WeightMap, params: dict[str, np.ndarray]) -> list[str]:
    """Rewrite the graph at `graph` with `params` (same architecture) through `mapping`; its folder (graph and
    external data) is replaced whole, atomically, if any weight changed. Returns the initializers that changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    changed = []
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
        value = np.ascontiguousarray(value.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)))
        if np.array_equal(value, numpy_helper.to_array(init)):
            continue
        init.CopyFrom(numpy_helper.from_array(value, init.name))
        changed.append(init.name)
    if changed:
        data = sorted(p.name for p in graph.parent.iterdir() if p.suffix == ".data")
        with atomic_dir(graph.parent) as tmp:
            onnx.save_model(model, str(tmp / graph.name), save_as_external_data=bool(data),
                            all_tensors_to_one_file=True, location=data[0] if data else None)
    return changed


__all__ = ["MAP_FORMAT", "ParamIndex", "RefitError", "WeightMap", "read_map", "refit_graph", "weight_map",
           "write_map"]
