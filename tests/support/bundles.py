"""Bundle helpers of the engine tests: a copy to change, and the batch dimensions of a graph's I/O set as the
manifest says (or fixed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from r2r.manifest import read_manifest, record_file, write_manifest


def set_batch_dims(root: Path, graph: str, fixed: int | None) -> bool:
    """Make dim 0 of `graph`'s I/O symbolic as the manifest says ("B", "2*B"), or fixed to `fixed` times its batch
    multiple; True if the graph changed.

    The export currently writes `guided_step` with a fixed batch of 2 although the manifest (and the graph's
    operations: Split into halves, Concat) say 2*B / B: TensorRT cannot build it for the bundle's batch range, and
    ONNX Runtime refuses any other batch. The tests repair their copy of the bundle (a no-op once export is fixed).
    """
    m = read_manifest(root)
    entry = m.graphs[graph]
    path = root / entry.file
    model = onnx.load(str(path), load_external_data=False)
    symbols = {t.name: t.shape[0] for t in entry.inputs + entry.outputs if isinstance(t.shape[0], str)}
    changed = False
    for v in list(model.graph.input) + list(model.graph.output):
        sym = symbols.get(v.name)
        if sym is None:
            continue
        dim = v.type.tensor_type.shape.dim[0]
        if fixed is None and dim.dim_param != sym:
            dim.dim_param = sym  # dim_param and dim_value are one field: this clears the fixed size
            changed = True
        elif fixed is not None:
            size = fixed * (int(sym.split("*")[0]) if "*" in sym else 1)
            if not dim.HasField("dim_value") or dim.dim_value != size:
                dim.dim_value = size
                changed = True
    if changed:
        del model.graph.value_info[:]  # intermediate shapes recorded for the old batch
        onnx.save(model, str(path))
        record_file(root, m, entry.file)
        write_manifest(root, m)
    return changed


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
