"""Graphs verified before they make an image (docs/design.md, "Verified engines").

When a backend opens the graphs of a program, each runs its canary (r2r/canary.py: the outputs recorded at export on
fixed inputs) through the backend itself: the same compiled model, cached blob, engine or module, the same `call`
the program binds. A graph whose outputs are off by more than its precision's bound, not finite, or that raises:

1. its opened form and cached artefact are dropped (`Backend.discard`: OpenVINO's compiled blob folder, ONNX
   Runtime's optimized graph in favour of the bundle's own, a TensorRT engine deserialized again) and it runs again;
2. a second miss refuses the backend at that precision (`EngineRejected`, naming the graph, the error and the
   fallback); `--backend auto` then takes the next row of the backend table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from r2r.canary import CanaryResult, bound, relative_error
from r2r.errors import R2RError
from r2r.log import log
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend

FALLBACK = "--backend onnxruntime --precision fp32"
# Where the fallback itself misses: the graph computes something else than when it was exported.
GRAPH_FIX = "export the bundle again with `r2r-export onnx`, or --backend reference"


class EngineRejected(R2RError, RuntimeError):
    """A backend at a precision that must not make images here: a graph missed its canary twice, or crashed the
    process that tried it. The message names the graph, what went wrong and the fallback."""

    def __init__(self, backend: str, precision: str, graph: str, reason: str, fallback: str = FALLBACK) -> None:
        self.backend, self.precision, self.graph, self.reason = backend, precision, graph, reason
        super().__init__(f"{backend} {precision}: the {graph} graph {reason}; no image is made with it here (use "
                         f"{fallback})")

    @property
    def short(self) -> str:
        return f"{self.backend} {self.precision} ({self.graph}: {self.reason})"


def run_canary(backend: Backend, bundle: Bundle, graph: str) -> CanaryResult:
    """`graph`'s canary through `backend`: buffers of the canary's shapes, one bound call per case, the worst output's
    relative error against the recorded one. An exception of the engine is a miss with its message."""
    size = backend.canary_size(bundle, graph)
    precision = backend.precision_of(graph)
    limit = bound(precision)
    worst, where = 0.0, graph
    cases = bundle.canary_cases(graph, size)  # a bundle without its canary is refused, not a miss
    t0 = time.perf_counter()
    try:
        for case in cases:
            buffers = {n: backend.empty(a.shape, a.dtype) for n, a in (*case.inputs.items(), *case.outputs.items())}
            for n, a in case.inputs.items():
                backend.upload(buffers[n], a)
            backend.call(graph, buffers)()
            for n, want in case.outputs.items():
                err = relative_error(backend.download(buffers[n]), want)
                if err >= worst:
                    worst, where = err, f"{graph} x{case.multiple} {n}"
    except (TypeError, AttributeError, NameError, AssertionError):
        raise  # a bug of r2r's, not a fault of the engine
    except Exception as exc:  # an engine's own error (ONNX Runtime's derive from Exception only)
        return CanaryResult(graph, precision, math.inf, limit, graph, time.perf_counter() - t0,
                            f"{type(exc).__name__}: {exc}"[:500])
    return CanaryResult(graph, precision, worst, limit, where, time.perf_counter() - t0)


@dataclass(frozen=True)
class Verified:
    """What the canaries of one backend's program found, and what they cost."""

    results: tuple[CanaryResult, ...]
    retried: tuple[str, ...]  # graphs that passed only once opened again

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def describe(self) -> str:
        worst = max(self.results, key=lambda r: r.error / r.bound, default=None)
        if worst is None:
            return "no graph"
        return (f"{len(self.results)} graphs in {self.seconds:.2f} s, worst {worst.where} at {worst.error:.2g} "
                f"(bound {worst.bound:g})")


def verify_graphs(backend: Backend, bundle: Bundle, graphs: Sequence[str],
                  progress: Callable[[str], None] = log) -> Verified:
    """Run each graph's canary through `backend`; a miss is opened again once, a second miss is `EngineRejected`."""
    results, retried = [], []
    for graph in graphs:
        result = run_canary(backend, bundle, graph)
        if not result.ok:
            dropped = backend.discard(graph)
            progress(f"r2r: {backend.name} {backend.precision}: the {graph} graph missed its canary "
                     f"({result.describe()}); {dropped or 'opening it again'}")
            result = run_canary(backend, bundle, graph)
            if not result.ok:
                fallback = GRAPH_FIX if (backend.name, backend.precision) == ("onnxruntime", "fp32") else FALLBACK
                raise EngineRejected(backend.name, backend.precision, graph,
                                     f"missed its canary twice ({result.describe()})", fallback)
            progress(f"r2r: {backend.name} {backend.precision}: the {graph} graph passed its canary once opened "
                     "again")
            retried.append(graph)
        results.append(result)
    return Verified(tuple(results), tuple(retried))


__all__ = ["FALLBACK", "GRAPH_FIX", "EngineRejected", "Verified", "run_canary", "verify_graphs"]
