"""One writer per bundle across processes (r2r/locks.py): several `r2r-run` processes on a cold cache all succeed
and the bundle (the graphs the program calls) is exported once; a writer waits for the holder and says so; the
lock is reentrant in a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from r2r import graph_io
from r2r.config import Variant
from r2r.locks import bundle_lock
from r2r.manifest import read_manifest
from r2r.runtime.scheduler import bundle_graphs

WAITER = """
import sys, time
from r2r.config import Variant
from r2r.locks import bundle_lock
from r2r.manifest import read_manifest
from r2r.runtime.scheduler import bundle_graphs
print("trying", flush=True)
t0 = time.perf_counter()
with bundle_lock(sys.argv[1], progress=lambda s: print(s, flush=True)):
    print(f"acquired after {time.perf_counter() - t0:.2f} s", flush=True)
"""


def test_a_second_writer_waits_for_the_holder_and_says_so(tmp_path: Path) -> None:
    """No timing assumption: the holder keeps the lock until the waiter has said it waits, then releases it."""
    bundle = tmp_path / "bundle"
    with bundle_lock(bundle), bundle_lock(bundle):  # reentrant: a builder may call another
        proc = subprocess.Popen([sys.executable, "-c", WAITER, str(bundle)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "trying"
        said = proc.stdout.readline()  # blocks until the waiter prints; it cannot acquire while we hold the lock
        assert "another process is writing" in said and str(bundle) in said, said
        assert proc.poll() is None  # still waiting while this process holds the lock
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.startswith("acquired after "), out


def test_runs_started_together_on_a_cold_cache_all_succeed_with_one_export(tmp_path: Path) -> None:
    """Three `r2r-run` processes, the embedded default, an empty cache: one exports and builds, the others wait
    and find every graph up to date; every output is written."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)).save(inputs / "shirt.png")
    env = {**os.environ, "R2R_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", "from r2r.runtime.cli import main; main()", "--input", str(inputs), "--steps", "4",
           "--strength", "0.5", "--threads", "1"]
    runs = [subprocess.Popen([*run, "--output", str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(3)]
    logs = [r.communicate(timeout=900)[0] for r in runs]
    for r, log in zip(runs, logs, strict=True):
        assert r.returncode == 0, log
    # the embedded default's own default program: step caching, whose whole UNet graph is unet_deep
    exported = [log for log in logs if f"{graph_io.UNET_DEEP:<11} exported in" in log]
    assert len(exported) == 1, logs
    for log in logs:
        if log is not exported[0]:
            assert f"{graph_io.UNET_DEEP:<11} up to date" in log and "exported in" not in log, log
    for i in range(3):
        assert Image.open(tmp_path / f"out{i}" / "shirt.png").size == (96, 128)
    [bundle] = list((tmp_path / "cache" / "bundles").iterdir())
    # only the graphs the default (fused, step-cached) program calls: no unet, emit or inject graph exported for it
    assert set(read_manifest(bundle).graphs) == set(bundle_graphs(Variant(fused=True), step_cache=True))
