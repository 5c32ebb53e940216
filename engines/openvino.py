"""OpenVINO "engines": models compiled for this CPU at the scheduler's exact shapes, cached in the bundle.

Compiling is what costs (seconds per graph for SD 1.5); OpenVINO's model cache turns later compiles
of the same graph, shapes and precision into loads. Building = making the scheduler for each batch
size once with a cache directory in the bundle, then recording the cache files in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from r2r.config import MethodConfig
from r2r.manifest import EngineEntry, bundle_path, read_manifest, record_file, write_manifest


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_ov_engines(bundle: Path, precision: str = "fp32", batches: Sequence[int] = (1,),
                     progress: Callable[[str], None] = _log) -> EngineEntry:
    from r2r.runtime.backend_ov import CACHE_DIR, OpenVinoBackend, import_openvino
    from r2r.runtime.bundle import open_bundle
    from r2r.runtime.scheduler import CoupledScheduler

    ov = import_openvino()
    b = open_bundle(bundle)
    slot = f"openvino/cpu-{precision}/all"
    key = hashlib.sha256(json.dumps([sorted((g, e.key) for g, e in b.manifest.graphs.items()), precision,
                                     sorted(batches), ov.__version__]).encode()).hexdigest()
    t0 = time.perf_counter()
    for batch in batches:
        for fused in (False, True):
            CoupledScheduler(b, OpenVinoBackend(b, precision), batch, b.method_defaults(), fused=fused)
        CoupledScheduler(b, OpenVinoBackend(b, precision), batch, MethodConfig(tac_divisor=b.method_defaults()
                                                                                 .tac_divisor),
                         inversion="single-pass")
    manifest = read_manifest(bundle)
    cache = bundle_path(bundle, CACHE_DIR)
    files = sorted(str(p.relative_to(Path(bundle).resolve())) for p in cache.resolve().rglob("*") if p.is_file())
    for f in files:
        record_file(bundle, manifest, f)
    entry = EngineEntry("openvino", precision, "all", files, key,
                        {"openvino": ov.__version__, "batches": list(batches),
                         "build_seconds": round(time.perf_counter() - t0, 1)})
    manifest.engines[slot] = entry
    write_manifest(bundle, manifest)
    size = sum(bundle_path(bundle, f).stat().st_size for f in files)
    progress(f"  {slot:<36} compiled in {entry.info['build_seconds']:.1f} s ({size / 1e6:.1f} MB cache)")
    return entry
