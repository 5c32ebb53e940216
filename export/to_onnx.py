"""Export of one torch graph module to ONNX with the contract's names and a dynamic batch axis."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from r2r import graph_io
from r2r.atomic import atomic_dir
from r2r.export.graphs import GraphSpec, dim_expr, spatial_dims
from r2r.manifest import TensorSpec

OPSET = 18
# Past this many bytes of weights a graph is written with ONNX external data (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class Sizes:
    """The image sizes a bundle's graphs take: sides in [min, max] (pixels), multiples of `multiple`; None bounds:
    a static bundle, of its example size only."""

    multiple: int
    width: tuple[int, int] | None = None  # (min, max)
    height: tuple[int, int] | None = None

    @property
    def dynamic(self) -> bool:
        return self.width is not None and self.height is not None


def _dims(batch_symbol: str, role: str, batch: Any, side: dict[str, Any], sizes: Sizes) -> dict[int, Any] | None:
    """torch.export's dynamic dimensions of one input."""
    dims: dict[int, Any] = {}
    k = graph_io.batch_multiple(batch_symbol) if batch_symbol else None
    if k is not None:
        dims[0] = batch if k == 1 else k * batch
    if sizes.dynamic:
        for axis, (factor, symbol) in spatial_dims(role, sizes.multiple).items():
            dims[axis] = side[symbol] if factor == 1 else factor * side[symbol]
    return dims or None


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, path: Path,
                 batch_max: int, sizes: Sizes) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """Export `module(*args)` to `path`, check it, and return its I/O specs. The graph's folder (the graph and its
    external data) is replaced as a whole, atomically.

    `args` must use a batch of 2 (B=2) and sides of at least 2 multiples, so the exporter cannot specialise a
    dynamic axis to 1.
    """
    batch = torch.export.Dim("B", min=1, max=max(batch_max, 2))
    side = {}
    if sizes.dynamic:
        assert sizes.width is not None and sizes.height is not None
        side = {graph_io.HM: torch.export.Dim(graph_io.HM, min=sizes.height[0] // sizes.multiple,
                                        max=sizes.height[1] // sizes.multiple),
                graph_io.WM: torch.export.Dim(graph_io.WM, min=sizes.width[0] // sizes.multiple,
                                        max=sizes.width[1] // sizes.multiple)}
    in_names = [n for n, _, _ in spec.inputs]
    out_names = [n for n, _, _ in spec.outputs]
    shapes: list[object] = [_dims(sym, role, batch, side, sizes) for _, sym, role in spec.inputs]
    params_sig = list(inspect.signature(module.forward).parameters.values())
    if params_sig and params_sig[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params_sig) - 1  # torch.export takes a *args parameter's shapes as one tuple
        shapes = [*shapes[:fixed], tuple(shapes[fixed:])]
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    external = params > EXTERNAL_DATA_BYTES
    with atomic_dir(path.parent) as tmpdir, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, input_names=in_names, output_names=out_names, opset_version=OPSET,
            dynamo=True, dynamic_shapes=tuple(shapes), optimize=True, verbose=False,
        )
        assert program is not None
        _name_dims(program.model, spec, sizes)
        program.save(tmpdir / path.name, external_data=external)
        check_graph(tmpdir / path.name)
    inputs, outputs = graph_io_specs(path, spec, sizes)
    return inputs, outputs, external


def _contract_dims(batch_symbol: str, role: str, sizes: Sizes) -> dict[int, str]:
    """axis -> the contract's expression ("2*B", "4*hm") of an input's or output's free dimensions."""
    expected = {0: batch_symbol} if batch_symbol else {}
    if sizes.dynamic:
        expected |= {a: dim_expr(f, sym) for a, (f, sym) in spatial_dims(role, sizes.multiple).items()}
    return expected


def _name_dims(model: Any, spec: GraphSpec, sizes: Sizes) -> None:
    """Name the graph's free input and output dimensions by the contract ("4*hm", not the exporter's "s60"), so that
    whatever reads the graph (a TensorRT network's output shapes, a viewer) sees the same names as the manifest."""
    import onnx_ir as ir

    want = {n: _contract_dims(sym, role, sizes) for n, sym, role in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        axes = want.get(value.name)
        if not axes or value.shape is None:
            continue
        dims = list(value.shape.dims)
        for axis, name in axes.items():
            if not isinstance(dims[axis], int):
                dims[axis] = name
        value.shape = ir.Shape(dims)


def check_graph(path: Path) -> None:
    """onnx.checker and strict shape inference, through the path API (works past 2 GB)."""
    onnx.checker.check_model(str(path), full_check=False)
    inferred = path.with_suffix(".inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    finally:
        inferred.unlink(missing_ok=True)


def graph_io_specs(path: Path, spec: GraphSpec, sizes: Sizes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read names, shapes and dtypes back from the saved graph; check them against the contract. Batch dimensions
    are recorded as the contract's symbols ("B", "2*B"), spatial ones (dynamic bundles) as its expressions of hm, wm
    ("4*hm"): the graph must have left them free."""
    model = onnx.load(str(path), load_external_data=False)
    roles = {n: (sym, role) for n, sym, role in (*spec.inputs, *spec.outputs)}

    def specs(values: list[onnx.ValueInfoProto], names: list[str]) -> list[TensorSpec]:
        got = [v.name for v in values]
        if got != names:
            raise RuntimeError(f"{path}: graph I/O {got} differ from the contract {names}")
        out = []
        for v in values:
            t = v.type.tensor_type
            dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            for axis, symbol in _contract_dims(*roles[v.name], sizes).items():
                if isinstance(dims[axis], int):
                    raise RuntimeError(f"{path}: {v.name} has a fixed dimension {axis} of {dims[axis]}; the contract "
                                       f"says {symbol} (the exporter specialised it)")
                dims[axis] = symbol
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out.append(TensorSpec(v.name, dims, dtype))
        return out

    return specs(list(model.graph.input), [n for n, _, _ in spec.inputs]), specs(
        list(model.graph.output), [n for n, _, _ in spec.outputs])
