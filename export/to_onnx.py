"""Export of one torch graph module to ONNX with the contract's names and a dynamic batch axis."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from r2r import graph_io as io
from r2r.atomic import atomic_dir
from r2r.export.graphs import GraphSpec
from r2r.manifest import TensorSpec

OPSET = 18
# Past this many bytes of weights a graph is written with ONNX external data (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _dim(symbol: str, batch: torch.export.Dim) -> object:
    k = io.batch_multiple(symbol) if symbol else None
    if k is None:
        return None
    return batch if k == 1 else k * batch


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, path: Path,
                 batch_max: int) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """Export `module(*args)` to `path`, check it, and return its I/O specs. The graph's folder (the graph and its
    external data) is replaced as a whole, atomically.

    `args` must use a batch of 2 (B=2), so the exporter cannot specialise the batch axis to 1.
    """
    batch = torch.export.Dim("B", min=1, max=max(batch_max, 2))
    in_names = [n for n, _ in spec.inputs]
    out_names = [n for n, _ in spec.outputs]
    shapes: list[object] = [{0: _dim(sym, batch)} if sym else None for _, sym in spec.inputs]
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
        program.save(tmpdir / path.name, external_data=external)
        check_graph(tmpdir / path.name)
    inputs, outputs = graph_io_specs(path, spec)
    return inputs, outputs, external


def check_graph(path: Path) -> None:
    """onnx.checker and strict shape inference, through the path API (works past 2 GB)."""
    onnx.checker.check_model(str(path), full_check=False)
    inferred = path.with_suffix(".inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    finally:
        inferred.unlink(missing_ok=True)


def graph_io_specs(path: Path, spec: GraphSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read names, shapes and dtypes back from the saved graph; check them against the contract."""
    model = onnx.load(str(path), load_external_data=False)
    symbols = dict(spec.inputs) | dict(spec.outputs)

    def specs(values: list[onnx.ValueInfoProto], names: list[str]) -> list[TensorSpec]:
        got = [v.name for v in values]
        if got != names:
            raise RuntimeError(f"{path}: graph I/O {got} differ from the contract {names}")
        out = []
        for v in values:
            t = v.type.tensor_type
            dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            if symbols[v.name]:
                if isinstance(dims[0], int):
                    raise RuntimeError(f"{path}: {v.name} has a fixed batch {dims[0]}; the contract says "
                                       f"{symbols[v.name]} (the exporter specialised the batch axis)")
                dims[0] = symbols[v.name]
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out.append(TensorSpec(v.name, dims, dtype))
        return out

    return specs(list(model.graph.input), [n for n, _ in spec.inputs]), specs(
        list(model.graph.output), [n for n, _ in spec.outputs])
