"""Which model parameter each initializer of an ONNX graph is, and a graph's weights rewritten from another model.

`weight_map` finds by content which parameter (and form: own name, renamed or reshaped, transposed) each initializer
is; `refit_graph` writes those initializers from a module of the same architecture and, once the result is checked
(export/graph_refit.py), replaces the graph's folder atomically. Why: docs/design.md, "The bundle" (Refit).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from r2r.atomic import atomic_dir, atomic_write
from r2r.errors import R2RError

if TYPE_CHECKING:
    from onnx import TensorProto

MAP_FORMAT = 1

# initializer name -> the (parameter name, transposed) it is; several where parameters of the original model are
# equal (e.g. norms at their initial ones): the new model must then have them equal too
WeightMap = dict[str, list[tuple[str, bool]]]


class RefitError(R2RError, ValueError):
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
    """Initializer name -> [(parameter name, transposed), ...] for the graph at `graph`, exported from `params`."""
    import onnx
    from onnx import numpy_helper

    index = params if isinstance(params, ParamIndex) else ParamIndex(params)
    found: WeightMap = {}
    for init in onnx.load(str(graph)).graph.initializer:
        value = numpy_helper.to_array(init)
        own = index.params.get(init.name)
        if own is not None and _content(own) == _content(value):
            found[init.name] = [(init.name, False)]
            continue
        hits = sorted(set(index.by_content.get(_content(value), [])))
        if hits:  # several: equal parameters, which content cannot tell apart
            found[init.name] = hits
    return found


def write_map(path: Path, graph: str, part: str, mapping: WeightMap) -> Path:
    """Save a graph's weight map (JSON, atomically)."""
    body = {"format": MAP_FORMAT, "graph": graph, "part": part,
            "initializers": {k: [[n, t] for n, t in v] for k, v in sorted(mapping.items())}}
    return atomic_write(path, json.dumps(body, indent=1, sort_keys=True) + "\n")


def read_map(path: Path, graph: str, part: str) -> WeightMap:
    """A saved weight map, checked for what it must be (the bundle's files are hostile until proven otherwise)."""
    try:
        body = json.loads(path.read_bytes())
        items = body["initializers"].items()
        ok = (body["format"] == MAP_FORMAT and body["graph"] == graph and body["part"] == part
              and all(isinstance(k, str) and v and all(isinstance(n, str) and n.startswith(f"{part}.")
                                                       and isinstance(t, bool) for n, t in v) for k, v in items))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RefitError(f"{path}: not a weight map ({exc}); record it again with `r2r-export onnx --refit`") from exc
    if not ok:
        raise RefitError(f"{path}: not a weight map of the {graph} graph; record it again with "
                         "`r2r-export onnx --refit`")
    return {k: [(n, t) for n, t in v] for k, v in items}


def _new_value(graph: Path, init: TensorProto, choices: list[tuple[str, bool]], params: dict[str, np.ndarray],
               dtype: np.dtype) -> np.ndarray:
    """An initializer's value in the new model, in the graph's shape and type."""
    missing = [n for n, _ in choices if n not in params]
    if missing:
        raise RefitError(f"{graph}: the new model has no parameter {missing[0]}")
    values = [params[n].T if t else params[n] for n, t in choices]
    value, name, dims = values[0], choices[0][0], tuple(init.dims)
    if any(v.shape != value.shape or not np.array_equal(v, value) for v in values[1:]):
        raise RefitError(f"{graph}: initializer {init.name} was {len(values)} equal parameters of the bundle's "
                         f"model ({', '.join(n for n, _ in choices[:3])}), which differ in the new one: which it is "
                         "cannot be told; export a new bundle with `r2r-export onnx`")
    if value.size == int(np.prod(dims)) and value.ndim != len(dims):
        value = value.reshape(dims)  # a reshaped copy
    if tuple(value.shape) != dims:
        raise RefitError(f"{graph}: {name} is {tuple(value.shape)} in the new model, {dims} in the bundle: another "
                         "architecture; export a new bundle")
    return np.ascontiguousarray(value.astype(dtype))


def _external(graph: Path, init: TensorProto) -> tuple[str, int, int] | None:
    """(data file, offset, length) of an initializer kept in external data; None if it is inside the graph."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entry = {e.key: e.value for e in init.external_data}
    location = entry.get("location", "")
    if Path(location).name != location or not (graph.parent / location).is_file():
        raise RefitError(f"{graph}: external data {location!r} is not a file beside the graph; re-export the bundle")
    return location, int(entry.get("offset", 0)), int(entry["length"])


def _stored(graph: Path, init: TensorProto, where: tuple[str, int, int] | None) -> np.ndarray:
    """An initializer's value as the graph holds it, read from its external data file (`where`) if it has one."""
    import onnx
    from onnx import numpy_helper

    if where is None:
        return numpy_helper.to_array(init)
    location, offset, length = where
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    count = int(np.prod(init.dims))
    if length != count * dtype.itemsize:
        raise RefitError(f"{graph}: {init.name} has {length} bytes of external data for {count} {dtype} values")
    return np.fromfile(graph.parent / location, dtype=dtype, count=count, offset=offset).reshape(tuple(init.dims))


def read_initializers(graph: Path, names: Collection[str]) -> dict[str, np.ndarray]:
    """The values of some of a graph's initializers, reading no other weights (a TensorRT refit's new weights)."""
    import onnx

    wanted = set(names)
    inits = [i for i in onnx.load(str(graph), load_external_data=False).graph.initializer if i.name in wanted]
    return {i.name: _stored(graph, i, _external(graph, i)) for i in inits}


def refit_graph(graph: Path, mapping: WeightMap, params: dict[str, np.ndarray],
                check: Callable[[Path], None] | None = None) -> list[str]:
    """Rewrite the graph at `graph` with `params` (same architecture) through `mapping`; if any weight changed, the
    rewritten graph is given to `check` (which raises to refuse it) and its folder (graph and external data) then
    replaces the old one whole, atomically. Returns the initializers that changed.

    Weights in external data are patched in place in a copy of the data file (the graph's structure, offsets
    included, stays byte for byte): no copy of a large graph's weights is held in memory."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    changed, patches, inline = [], [], False
    for init in model.graph.initializer:
        if init.name not in mapping:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        value = _new_value(graph, init, mapping[init.name], params, dtype)
        where = _external(graph, init)
        if np.array_equal(value, _stored(graph, init, where)):
            continue
        changed.append(init.name)
        if where is None:
            init.CopyFrom(numpy_helper.from_array(value, init.name))
            inline = True
        else:
            patches.append((where, value))
    if changed:
        with atomic_dir(graph.parent) as tmp:
            for f in graph.parent.iterdir():
                if f.is_file() and f.name != graph.name:
                    shutil.copyfile(f, tmp / f.name)
            for (location, offset, _), value in patches:
                with open(tmp / location, "r+b") as fh:
                    fh.seek(offset)
                    fh.write(value.tobytes())
            if inline:
                onnx.save_model(model, str(tmp / graph.name))  # external references kept as they are
            else:
                shutil.copyfile(graph, tmp / graph.name)
            del model, patches
            if check is not None:
                check(tmp / graph.name)
    return changed


__all__ = ["MAP_FORMAT", "ParamIndex", "RefitError", "WeightMap", "read_initializers", "read_map", "refit_graph",
           "weight_map", "write_map"]
