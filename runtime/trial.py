"""A backend's first use on a machine, tried in a child process (`python -m r2r.runtime.trial`).

The child opens a bundle's graphs and runs their canaries (twice where an open compiles a cache); each graph's
verdict (ok, rejected, crashed with its signal) goes to the bundle's `verdicts.json` under its own lock, keyed by
graph, engine files, backend, device, precision, threads, library version and machine; no later run loads a graph
that crashed.
Why: docs/design.md, "Verified engines".
"""

from __future__ import annotations

import hashlib
import importlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from r2r.atomic import atomic_write
from r2r.backends import backend_row
from r2r.errors import R2RError
from r2r.log import log
from r2r.machine import cpu_identity
from r2r.manifest import BundleError
from r2r.runtime.bundle_reader import Bundle, open_bundle
from r2r.runtime.verify import EngineRejected, verify_graphs

VERDICTS_FILE = "verdicts.json"
TRIAL_LOCK = ".r2r-trial.lock"
REJECTED_EXIT = 3  # the child's exit code when a graph missed its canary twice
TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class TrialSpec:
    """What a child process opens: the bundle through one backend, device, precision and thread count."""

    bundle: str
    backend: str
    device: str
    precision: str
    threads: int
    graphs: tuple[str, ...]
    model: str | None = None  # the torch backend runs the model's modules


class TrialFailed(R2RError, RuntimeError):
    """The child process of a first-use check failed for another reason than the engine (its message says why)."""


def library_version(backend: str) -> str:
    """The version of the library a backend row runs on (openvino, onnxruntime, tensorrt, torch)."""
    module = importlib.import_module(backend_row(backend).library)
    return str(getattr(module, "__version__", "unknown"))


def machine_identity(device: str) -> dict[str, Any]:
    """The CPU's model and ISA; on CUDA also the GPU's name."""
    ident: dict[str, Any] = dict(cpu_identity())
    if device == "cuda":
        try:
            from r2r.gpu import gpu_info

            ident["gpu"] = gpu_info()["name"]
        except (ImportError, RuntimeError):
            import torch

            ident["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    return ident


def verdict_key(bundle: Bundle, spec: TrialSpec, graph: str, library: str, machine: dict[str, Any]) -> str:
    """A graph's verdict is valid for this graph and its engine files, backend, device, precision, threads, library
    version and machine only."""
    m = bundle.manifest
    engines = sorted(e.key for e in m.engines.values()
                     if e.backend == spec.backend and e.precision == spec.precision and e.graph in (graph, "all"))
    graph_id = m.graphs[graph].key if graph in m.graphs else sorted(
        e["key"] for e in m.canaries.values() if e.get("graph") == graph)
    parts = [graph, graph_id, engines, spec.backend, spec.device, spec.precision, spec.threads, library, machine]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_verdicts(root: Path) -> dict[str, dict[str, Any]]:
    path = root / VERDICTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: the graphs are tried again and the file rewritten
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Outcome:
    """What a child process said of each graph."""

    passed: tuple[str, ...]  # opened and checked (twice where the first open compiles a cache)
    failed: str | None = None  # the graph it was in when it crashed or refused
    verdict: str = "ok"  # ok | rejected | crashed
    reason: str = ""


def signal_name(rc: int) -> str:
    try:
        return f"signal {-rc}, {signal.Signals(-rc).name}"
    except ValueError:
        return f"signal {-rc}"


def opens(backend: str) -> int:
    """How many times the child opens each graph: twice where the first open compiles a cache the second loads, as
    every later process will."""
    return 2 if backend_row(backend).caches_on_open else 1


def run_child(spec: TrialSpec, command: Sequence[str] | None = None,
              progress: Callable[[str], None] = log) -> Outcome:
    """Run the trial in a child process and read what it said (`command`: the child, for tests)."""
    argv = list(command) if command is not None else [sys.executable, "-m", "r2r.runtime.trial"]
    proc = subprocess.run([*argv, json.dumps(asdict(spec))], capture_output=True, text=True, timeout=TIMEOUT_S)
    opened: list[str] = []
    checks: dict[str, int] = {}
    rejected: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "open":
            opened.append(rest)
        elif word == "ok":
            checks[rest] = checks.get(rest, 0) + 1
        elif word == "rejected":
            rejected = json.loads(rest)
        elif word == "log":
            progress(rest)
    passed = tuple(g for g in spec.graphs if checks.get(g, 0) >= opens(spec.backend))
    if proc.returncode == 0:
        return Outcome(passed)
    if proc.returncode == REJECTED_EXIT and rejected:
        return Outcome(passed, rejected["graph"], "rejected", rejected["reason"])
    if proc.returncode < 0:
        return Outcome(passed, opened[-1] if opened else None, "crashed",
                       f"crashed the process that tried it ({signal_name(proc.returncode)})")
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:]) or f"exit code {proc.returncode}"
    raise TrialFailed(f"the first-use check of {spec.backend} {spec.precision} on {spec.bundle} failed:\n{tail}")


def check_first_use(bundle: Bundle, spec: TrialSpec, progress: Callable[[str], None] = log,
                    command: Sequence[str] | None = None) -> None:
    """Raise `EngineRejected` if a graph of `spec` crashed or was refused on this machine, trying the graphs that
    have no verdict here yet in a child process first (one trial per bundle at a time; a waiting process reads the
    verdicts the first one recorded)."""
    missing = [g for g in spec.graphs if not any(e.get("graph") == g for e in bundle.manifest.canaries.values())]
    if missing:
        raise BundleError(f"{bundle.root}: no canary for the {', '.join(missing)} graph(s) (its engines cannot be "
                          f"checked before they make an image); record them with `r2r-export canary --bundle "
                          f"{bundle.root}`")
    library, machine = library_version(spec.backend), machine_identity(spec.device)
    keys = {g: verdict_key(bundle, spec, g, library, machine) for g in spec.graphs}

    def refuse_known_bad(verdicts: dict[str, dict[str, Any]]) -> None:
        for g in spec.graphs:
            v = verdicts.get(keys[g], {})
            if v.get("verdict") not in (None, "ok"):
                raise EngineRejected(spec.backend, spec.precision, g,
                                     f"{v['reason']} when it was first tried on this machine ({v.get('when', '?')})")

    verdicts = read_verdicts(bundle.root)
    refuse_known_bad(verdicts)
    if all(k in verdicts for k in keys.values()):
        return
    try:
        with FileLock(str(bundle.root / TRIAL_LOCK), is_singleton=True):
            verdicts = read_verdicts(bundle.root)
            refuse_known_bad(verdicts)
            todo = tuple(g for g in spec.graphs if keys[g] not in verdicts)
            if todo:
                verdicts |= _try(bundle, spec, todo, keys, library, machine, progress, command)
    except OSError as exc:  # a read-only bundle: tried, not recorded (every process tries again)
        progress(f"r2r: verdicts not recorded in {bundle.root} ({exc})")
        verdicts |= _try(bundle, spec, tuple(g for g in spec.graphs if keys[g] not in verdicts), keys, library,
                         machine, progress, command, record=False)
    refuse_known_bad(verdicts)


def _try(bundle: Bundle, spec: TrialSpec, graphs: tuple[str, ...], keys: dict[str, str], library: str,
         machine: dict[str, Any], progress: Callable[[str], None], command: Sequence[str] | None,
         record: bool = True) -> dict[str, dict[str, Any]]:
    progress(f"r2r: first use of {spec.backend} {spec.precision} for this bundle on this machine: checking "
             f"{', '.join(graphs)} in a child process")
    t0 = time.perf_counter()
    outcome = run_child(TrialSpec(spec.bundle, spec.backend, spec.device, spec.precision, spec.threads, graphs,
                                  spec.model), command, progress)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    common = {"backend": spec.backend, "device": spec.device, "precision": spec.precision, "threads": spec.threads,
              "library": library, "machine": machine, "when": when}
    new = {keys[g]: {"graph": g, "verdict": "ok", **common} for g in outcome.passed}
    if outcome.failed is not None:
        new[keys[outcome.failed]] = {"graph": outcome.failed, "verdict": outcome.verdict, "reason": outcome.reason,
                                     **common}
    progress(f"r2r: first-use check of {spec.backend} {spec.precision} done in {time.perf_counter() - t0:.1f} s: "
             + ("ok" if outcome.failed is None else f"the {outcome.failed} graph {outcome.reason}"))
    if record:
        path = bundle.root / VERDICTS_FILE
        atomic_write(path, json.dumps({**read_verdicts(bundle.root), **new}, indent=2, sort_keys=True) + "\n")
    return new


def _child(spec: TrialSpec) -> int:
    """The child: open the backend and check every graph (twice where the first open compiles a cache the second
    loads); one line per event on stdout."""
    from r2r.runtime.select import runtime_module

    bundle = open_bundle(spec.bundle)
    row = backend_row(spec.backend)
    for _ in range(opens(spec.backend)):
        backend = runtime_module(row).open_backend(bundle, spec.device, spec.precision, spec.threads,
                                                   model=Path(spec.model) if spec.model else None)
        try:
            for graph in spec.graphs:
                print(f"open {graph}", flush=True)
                verify_graphs(backend, bundle, [graph], progress=lambda s: print(f"log {s}", flush=True))
                print(f"ok {graph}", flush=True)
        except EngineRejected as exc:
            print(f"rejected {json.dumps({'graph': exc.graph, 'reason': exc.reason})}", flush=True)
            return REJECTED_EXIT
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    return 0


__all__ = ["REJECTED_EXIT", "TRIAL_LOCK", "VERDICTS_FILE", "Outcome", "TrialFailed", "TrialSpec", "check_first_use",
           "library_version", "machine_identity", "read_verdicts", "run_child", "verdict_key"]


if __name__ == "__main__":
    raw = json.loads(sys.argv[1])
    sys.exit(_child(TrialSpec(**{**raw, "graphs": tuple(raw["graphs"])})))
