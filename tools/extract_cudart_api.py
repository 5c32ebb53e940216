#!/usr/bin/env python3
"""Extract the CUDA runtime API of cuda-python (`cuda.bindings.runtime`), as shipped, into `cudart_api.json`.

Usage (cuda-python installs and imports without a GPU; its calls then return cudaErrorInsufficientDriver)::

    pip install cuda-python
    python tools/extract_cudart_api.py            # -> tests/support/api/cudart_api.json

Every public `cuda*` function with its argument names (from the signature line that Cython embeds at the top of
each docstring) and its return tuple (the "Returns" section: a cudaError_t first, then the outputs), every enum
with its members and values, the module's integer constants, and the fields of the structs the project reads.
`used` lists the names r2r's TensorRT path calls; the script fails if one is missing.

cuda-python's runtime functions return a tuple `(cudaError_t, *outputs)` instead of raising; so does every
function recorded here (`returns` starts with `cudaError_t`).

Standard library only (plus the module being described).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from extract_trt_api import API_DIR, dump, write_listing

# What r2r's TensorRT builder and runtime call, and the structs/enums they read.
USED = [
    "cudaGetDeviceCount", "cudaGetDevice", "cudaSetDevice", "cudaGetDeviceProperties", "cudaRuntimeGetVersion",
    "cudaDriverGetVersion", "cudaGetErrorName", "cudaGetErrorString",
    "cudaStreamCreate", "cudaStreamCreateWithFlags", "cudaStreamDestroy", "cudaStreamSynchronize",
    "cudaMalloc", "cudaMallocAsync", "cudaFree", "cudaFreeAsync", "cudaMallocHost", "cudaFreeHost",
    "cudaMemcpy", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaMemGetInfo",
    "cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaStreamIsCapturing", "cudaGraphInstantiate",
    "cudaGraphInstantiateWithFlags", "cudaGraphLaunch", "cudaGraphUpload", "cudaGraphDestroy",
    "cudaGraphExecDestroy",
    "cudaEventCreate", "cudaEventCreateWithFlags", "cudaEventRecord", "cudaEventSynchronize",
    "cudaEventElapsedTime", "cudaEventDestroy", "cudaStreamWaitEvent",
    "cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStreamCaptureStatus", "cudaDeviceProp",
    "cudaStream_t", "cudaEvent_t", "cudaGraph_t", "cudaGraphExec_t",
]
STRUCTS = ["cudaDeviceProp"]


def parse_signature(name: str, doc: str) -> tuple[list[str], str]:
    first = doc.strip().splitlines()[0] if doc and doc.strip() else ""
    m = re.fullmatch(re.escape(name) + r"\((.*)\)", first.strip())
    if not m:
        return [], ""
    args = []
    for part in (p.strip() for p in m.group(1).split(",") if p.strip()):
        head = part.split("=")[0].split(":")[0].strip()
        args.append(head.split()[-1] + ("=" if "=" in part else ""))
    return args, first.strip()


def parse_returns(doc: str) -> list[str]:
    """['cudaError_t', 'event: cudaEvent_t', ...] from the numpy-style Returns section."""
    lines = (doc or "").splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() == "Returns" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            for entry in lines[i + 2:]:
                if entry and not entry[0].isspace():
                    if set(entry.strip()) == {"-"}:
                        out.pop()  # that was the next section's title
                        break
                    name, _, typ = entry.partition(" : ")
                    typ = re.sub(r":py:obj:`~?\.?([^`]*)`", r"\1", typ).strip()
                    out.append(f"{name.strip()}: {typ}" if typ else name.strip())
            break
    return out


def extract(module_name: str) -> dict:
    mod = importlib.import_module(module_name)
    functions, enums, constants, structs, types_ = {}, {}, {}, {}, []
    for name in sorted(dir(mod)):
        if not name.startswith("cuda"):
            continue
        obj = getattr(mod, name)
        if isinstance(obj, type) and (hasattr(obj, "__members__") or type(obj).__name__.endswith("EnumMetaclass")):
            members = list(obj)
            enums[name] = {m.name: int(m) for m in members}
        elif isinstance(obj, type):
            types_.append(name)
            if name in STRUCTS:
                structs[name] = sorted(a for a in dir(obj) if not a.startswith("_"))
        elif callable(obj):
            args, sig = parse_signature(name, obj.__doc__ or "")
            functions[name] = {"args": args, "returns": parse_returns(obj.__doc__ or ""), "signature": sig}
        elif isinstance(obj, int):
            constants[name] = int(obj)
    known = set(functions) | set(enums) | set(types_) | set(structs)
    missing = [n for n in USED if n not in known]
    if missing:
        raise SystemExit(f"{module_name} lacks {missing}")
    dist = "cuda-bindings"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        dist, version = "cuda-python", importlib.metadata.version("cuda-python")
    try:
        meta = importlib.metadata.version("cuda-python")
    except importlib.metadata.PackageNotFoundError:
        meta = None
    probe = mod.cudaGetDeviceCount()
    return {
        "module": module_name, "import": "from cuda.bindings import runtime as cudart",
        "cuda_bindings_version": version, "cuda_python_version": meta,
        "no_gpu_probe": {"cudaGetDeviceCount": str(probe[0])},
        "used": USED, "functions": functions, "enums": enums, "constants": constants, "structs": structs,
        "types": types_,
        "counts": {"functions": len(functions), "enums": len(enums), "constants": len(constants)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", default="cuda.bindings.runtime")
    ap.add_argument("--out", type=Path, default=API_DIR / "cudart_api.json")
    args = ap.parse_args(argv)
    api = extract(args.module)
    write_listing(args.out, dump(api, expand={"functions", "enums", "structs"}.__contains__, sort_inner=False))
    c = api["counts"]
    print(f"cuda-bindings {api['cuda_bindings_version']}: {c['functions']} functions, {c['enums']} enums, "
          f"{c['constants']} constants -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
