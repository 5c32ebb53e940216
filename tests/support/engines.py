"""Test doubles and helpers for the verified-engines tests: a backend that poisons one image with NaN, an OpenVINO
blob made to compute wrong numbers, which kernels OpenVINO ran (for failure messages), and a backend that records
its bindings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.device import DeviceArray


class NanImageBackend(OrtBackend):
    """ONNX Runtime, but the model input of image `row` of every batch of 2 or more is NaN, as an engine fault would
    make it: everything the program computes for that image is then not finite, the other images untouched (the
    graphs compute each image of a batch on its own)."""

    def __init__(self, bundle, row: int = 1) -> None:
        super().__init__(bundle)
        self.row = row

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        super().upload(dst, src)
        if len(dst.shape) == 4 and dst.shape[1] == 3 and dst.shape[0] > self.row:  # [B, 3, H, W]: the images
            assert dst.host is not None
            dst.host[self.row] = np.nan


def zero_blob_weights(folder: Path) -> Path:
    """Zero the second quarter of the compiled blob in an OpenVINO cache folder: OpenVINO still loads it (its
    header and structure are intact) and computes with zeroed weights, a wrong output with no error (what a blob
    compiled for another configuration, or damaged on disk, does). Returns the blob."""
    blob = next(p for p in folder.iterdir() if p.suffix == ".blob")
    data = bytearray(blob.read_bytes())
    n = len(data)
    data[n // 2: n // 2 + n // 4] = bytes(n // 4)
    blob.write_bytes(bytes(data))
    return blob


def negate_conv_kernels(root: Path, graph: str) -> None:
    """Rewrite `graph` of the bundle at `root` with every convolution kernel negated, its hash re-recorded: a valid
    graph that computes another function behind the manifest's back (what a bad rewrite or refit would leave), so
    every engine built from it misses the canary recorded at export."""
    import onnx
    from onnx import numpy_helper

    from r2r.manifest import bundle_path, read_manifest, record_file, write_manifest

    m = read_manifest(root)
    path = bundle_path(root, m.graphs[graph].file)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim == 4:
            init.CopyFrom(numpy_helper.from_array(-a, init.name))
    onnx.save(model, str(path))
    record_file(root, m, m.graphs[graph].file)
    write_manifest(root, m)


def openvino_kernels(graph: Path, precision_hint: str, inputs: Sequence[np.ndarray]) -> str:
    """The kernel types OpenVINO's CPU plugin runs `graph` with at a precision hint (from its profiling counters):
    which ISA did the work (jit_avx512_bf16, brgemm_avx512_amx, ...), for a failure message."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": precision_hint,
                                                          "PERF_COUNT": True})
    req = compiled.create_infer_request()
    req.infer(list(inputs))
    counts = Counter(p.exec_type for p in req.profiling_info)
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common(6))


def openvino_kernels_note(bundle, graph: Path, precision_hint: str) -> str:
    """Which kernels OpenVINO ran a UNet graph with on this CPU (on the bundle's unet canary inputs), for the failure
    message of a reduced-precision test: the ISA that did the work."""
    from r2r import graph_io
    from r2r.canary import canary_slot, load_cases
    from r2r.machine import cpu_identity
    from r2r.manifest import bundle_path

    size = tuple(bundle.manifest.sizes["min"])
    case = load_cases(bundle_path(bundle.root, bundle.manifest.canaries[canary_slot(graph_io.UNET, size)]["file"]))[0]
    return (f"on {cpu_identity()}: OpenVINO {precision_hint} kernels of {graph.name}: "
            f"{openvino_kernels(graph, precision_hint, list(case.inputs.values()))}")


def torch_kernels_note() -> str:
    """The CPU and the vector ISA torch's kernels dispatch to here, for a failure message."""
    import torch

    from r2r.machine import cpu_identity

    return f"on {cpu_identity()}: torch {torch.__version__} dispatches to {torch.backends.cpu.get_cpu_capability()}"


class RecordingBackend(OrtBackend):
    """Records every binding so the test can compare buffer addresses."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.calls: list[tuple[str, dict]] = []

    def call(self, graph, bindings):
        self.calls.append((graph, {k: (v.ptr, v.shape) for k, v in bindings.items()}))
        return super().call(graph, bindings)


__all__ = ["NanImageBackend", "RecordingBackend", "negate_conv_kernels", "openvino_kernels", "openvino_kernels_note",
           "torch_kernels_note", "zero_blob_weights"]
