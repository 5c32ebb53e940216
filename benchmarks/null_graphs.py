"""Trivially cheap graphs with a bundle's exact I/O, to measure the scheduler's own time per step.

A null bundle has the real bundle's manifest and conditioning, but each graph only copies or fills its
outputs (Identity / ConstantOfShape), so a run's time is the host-side cost of the coupled scheduler:
binding-free calls, in-place updates, the Python between them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from r2r import graph_io
from r2r.export.canary import record_graph_canaries
from r2r.export.to_onnx import OPSET
from r2r.manifest import MANIFEST, Manifest, TensorSpec, bundle_path, read_manifest, record_file, write_manifest

IR_VERSION = 10  # what onnxruntime 1.18+ loads; onnx.helper would stamp its newest
_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}


def _value(spec: TensorSpec) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d).replace("*", "x") for d in spec.shape]
    return helper.make_tensor_value_info(spec.name, _TYPES[spec.dtype], dims)


def _null_graph(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> onnx.ModelProto:
    """Each output: Identity of the same-shaped input if there is one, else zeros of its shape with the
    batch read from the first input."""
    nodes = []
    first = inputs[0].name
    nodes.append(helper.make_node("Shape", [first], ["_batch"], start=0, end=1))
    by_shape = {tuple(t.shape): t.name for t in inputs}
    for k, out in enumerate(outputs):
        src = by_shape.get(tuple(out.shape))
        if src is not None:
            nodes.append(helper.make_node("Identity", [src], [out.name]))
            continue
        # batch of the output = batch of the first input * (multiple of B in the output / in the input)
        rest = helper.make_tensor(f"_rest{k}", TensorProto.INT64, [len(out.shape) - 1], list(out.shape[1:]))
        nodes.append(helper.make_node("Constant", [], [f"_rest{k}"], value=rest))
        mult_out = _multiple(out.shape[0])
        mult_in = _multiple(inputs[0].shape[0])
        batch = "_batch"
        if mult_out != mult_in:
            scale = helper.make_tensor(f"_s{k}", TensorProto.INT64, [1], [mult_out])
            div = helper.make_tensor(f"_d{k}", TensorProto.INT64, [1], [mult_in])
            nodes += [helper.make_node("Constant", [], [f"_s{k}"], value=scale),
                      helper.make_node("Constant", [], [f"_d{k}"], value=div),
                      helper.make_node("Mul", ["_batch", f"_s{k}"], [f"_bm{k}"]),
                      helper.make_node("Div", [f"_bm{k}", f"_d{k}"], [f"_b{k}"])]
            batch = f"_b{k}"
        nodes.append(helper.make_node("Concat", [batch, f"_rest{k}"], [f"_shape{k}"], axis=0))
        zero = helper.make_tensor(f"_z{k}", _TYPES[out.dtype], [1], [0])
        nodes.append(helper.make_node("ConstantOfShape", [f"_shape{k}"], [out.name], value=zero))
    graph = helper.make_graph(nodes, f"null_{name}", [_value(t) for t in inputs], [_value(t) for t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _multiple(dim: int | str) -> int:
    return graph_io.batch_multiple(dim) or 1


def _at_example_size(shape: list[int | str], env: dict[str, int]) -> list[int | str]:
    """A shape with its spatial dimensions at the bundle's example size, its batch symbols kept."""
    return [d if isinstance(d, int) or d.replace(" ", "").endswith(graph_io.BATCH) else graph_io.eval_dim(d, env)
            for d in shape]


def make_null_bundle(bundle: Path, out: Path, graphs: tuple[str, ...] = graph_io.DEFAULT_GRAPHS) -> Path:
    """Copy `bundle`'s manifest and conditioning into `out` with null graphs of the same I/O at the bundle's example
    size (a static-size null bundle: the scheduler's own time does not depend on the range)."""
    read_manifest(bundle)  # the source must be a valid bundle
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = Manifest.from_dict(json.loads((bundle / MANIFEST).read_text()))
    manifest.files, manifest.engines, manifest.canaries = {}, {}, {}
    m, opt = manifest.sizes["multiple"], manifest.sizes["opt"]
    env = {graph_io.HM: opt[1] // m, graph_io.WM: opt[0] // m}
    manifest.sizes = {**manifest.sizes, "min": list(opt), "max": list(opt)}
    for entry in manifest.graphs.values():
        for spec in (*entry.inputs, *entry.outputs):
            spec.shape = _at_example_size(spec.shape, env)
    cond = manifest.cond["file"]
    bundle_path(out, cond).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bundle_path(bundle, cond), bundle_path(out, cond))
    record_file(out, manifest, cond)
    for name, entry in manifest.graphs.items():
        if name not in graphs:
            continue
        path = bundle_path(out, entry.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(_null_graph(name, entry.inputs, entry.outputs), str(path))
        manifest.graphs[name].external_data = False
        record_file(out, manifest, entry.file)
    record_graph_canaries(out, manifest, progress=lambda _: None)  # the null graphs' own (constant) outputs
    write_manifest(out, manifest)
    return out
