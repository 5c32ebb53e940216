"""Canaries (docs/design.md, "Verified engines"): each graph's outputs on a small fixed input, recorded in the bundle
at export and compared with what a backend computes whenever it opens the graph.

Engines have bugs that turn into wrong numbers without an error (a cached blob compiled for another configuration,
a corrupted kernel on one CPU family, a bad weight file): a graph that misses its canary is never used to make an
image. This module is what every stage shares: the cases of a graph (its inputs at each batch multiple the program
binds it at), their file, and the bound each precision is held to. Export computes the expected outputs (ONNX Runtime
fp32 on the graph; `r2r.export.canary`), the runtime runs them through a backend (`r2r.runtime.verify`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r2r import graph_io
from r2r.graph_io import key_level
from r2r.manifest import CANARY_DIR

FORMAT = 1  # of the cases below: a change makes every recorded canary out of date (its key changes)
TIMESTEP = 500.0  # the UNet's canary timestep: mid-schedule, where neither the noise nor the image dominates
COEF = (0.9, 0.1, 7.5)  # cz, ce, w of the step graphs' canary

# Relative L2 error of a graph's outputs against the recorded fp32 outputs (|got - want| / |want| over each output
# tensor), per precision the graph runs at. Measured (docs/design.md, "Verified engines"; every graph, every call
# multiple): fp32 engines on the CPU stay below 4e-6 (OpenVINO against ONNX Runtime), bf16 below 0.035 (OpenVINO and
# torch; 0.010 on the trained embedded default, 0.035 on a random-init tiny model, 0.032 on the random SD 1.5
# architecture), OpenVINO's INT8 UNet 0.028. A broken engine is far above: an all-zero output (a black image) is
# 1.0, a blob with zeroed weights 0.5, a non-finite output infinite. Each bound is several times the worst seen.
# "tf32": fp32 on CUDA, where TensorRT, cuDNN and ONNX Runtime's CUDA provider run matrix products in TF32 by default.
BOUNDS: dict[str, float] = {"fp32": 1e-3, "tf32": 5e-2, "fp16": 0.15, "bf16": 0.15, "int8": 0.3, "fp8": 0.3}


def canary_file(graph: str, size: tuple[int, int]) -> str:
    """The bundle-relative file of `graph`'s canary at `size` (W, H)."""
    return f"{CANARY_DIR}/{graph}-{size[0]}x{size[1]}.safetensors"


def canary_slot(graph: str, size: tuple[int, int]) -> str:
    """The manifest's key of one canary: "<graph>@<W>x<H>"."""
    return f"{graph}@{size[0]}x{size[1]}"


def canary_key(graph_key: str, size: tuple[int, int]) -> str:
    """What a canary is made from: its graph (by the graph's own key), its size and this module's cases."""
    return hashlib.sha256(json.dumps([graph_key, list(size), FORMAT]).encode()).hexdigest()


@dataclass(frozen=True)
class CanaryCase:
    """One call of a graph: batch multiple `multiple` of an image batch of 1, its inputs and the outputs recorded."""

    multiple: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class GraphShape:
    """What a graph's canary inputs are made from: the bundle's latent channels, pixel multiple, text conditioning
    and TAC layers (level, channels), attention pool and step caching's deep channels, all in its manifest."""

    channels: int
    c_null: np.ndarray  # [1, 77, d]
    c_neg: np.ndarray
    tac_layers: Sequence[Mapping[str, int]]
    pool: int = 1
    deep_channels: int = 0  # 0: a bundle without step caching


def routing(multiple: int) -> np.ndarray:
    """`tac_src` of the routed UNet for one image as the program binds it: the identity at 1 and 2, the fused TAC
    step [cg, neg, null -> cg] at 3 and with a text row under TAC [cg, neg, null -> cg, text -> cg] at 4."""
    return np.array({3: [0, 1, 0], 4: [0, 1, 0, 0]}.get(multiple, list(range(multiple))), np.int64)


def conditioning(graph: str, multiple: int, shape: GraphShape) -> np.ndarray:
    """The rows of text conditioning the program gives `graph` at `multiple` (null for the plain and cg batches;
    the text row of the 4x call: the null text, as an image without a prompt has it)."""
    rows = {1: [shape.c_null], 2: [shape.c_neg, shape.c_null], 3: [shape.c_null, shape.c_neg, shape.c_null],
            4: [shape.c_null, shape.c_neg, shape.c_null, shape.c_null]}
    return np.concatenate(rows[2 if graph == graph_io.UNET_INJECT else multiple]).astype(np.float32)


def make_inputs(graph: str, multiple: int, size: tuple[int, int], shape: GraphShape, seed: int = 0
                ) -> dict[str, np.ndarray]:
    """The canary inputs of `graph` for one image at `size` (W, H) called at batch `multiple`: seeded normal latents
    (the scale of the program's latents), the bundle's own conditioning and the program's routing."""
    w, h = size[0] // 8, size[1] // 8
    c = shape.channels
    rng = np.random.default_rng([seed, sum(graph.encode()), multiple])

    def normal(*dims: int) -> np.ndarray:
        return rng.standard_normal(dims).astype(np.float32)

    if graph in (*graph_io.UNET_GRAPHS, *graph_io.STEP_CACHE_GRAPHS):
        rows = 2 if graph == graph_io.UNET_INJECT else multiple
        out = {graph_io.SAMPLE: normal(rows, c, h, w), graph_io.TIMESTEP: np.array([TIMESTEP], np.float32),
               graph_io.ENCODER_HIDDEN_STATES: conditioning(graph, multiple, shape)}
        if graph in graph_io.ROUTED_GRAPHS:
            out[graph_io.TAC_SRC] = routing(multiple)
        if graph == graph_io.UNET_SHALLOW:  # seeded normal features in place of a whole call's
            out[graph_io.DEEP] = normal(rows, shape.deep_channels, h, w)
        if graph == graph_io.UNET_INJECT:
            for i, layer in enumerate(shape.tac_layers):
                for name, level in ((graph_io.tac_q(i), layer["level"]),
                                    (graph_io.tac_k(i), key_level(layer["level"], shape.pool))):
                    out[name] = normal(1, h >> level, w >> level, layer["channels"])
        return out
    if graph == graph_io.VAE_ENCODER:
        return {graph_io.IMAGE: rng.uniform(-1.0, 1.0, (1, 3, size[1], size[0])).astype(np.float32)}
    if graph == graph_io.VAE_DECODER:
        return {graph_io.LATENT: normal(1, c, h, w)}
    if graph in graph_io.STEP_GRAPHS:
        rows = {graph_io.GUIDED_STEP: 2, graph_io.GUIDED_TEXT_STEP: 3}.get(graph, 1)
        out = {graph_io.Z: normal(1, c, h, w), graph_io.EPS: normal(rows, c, h, w),
               graph_io.COEF: np.array(COEF, np.float32)}
        if graph == graph_io.GUIDED_TEXT_STEP:
            out[graph_io.W_TEXT] = np.array([1.5], np.float32)
        return out
    raise ValueError(f"no canary for graph {graph!r}")


def multiples(graph: str) -> tuple[int, ...]:
    """The batch multiples a canary calls `graph` at: every one the program binds (graph_io.CALL_MULTIPLES)."""
    return graph_io.CALL_MULTIPLES[graph]


def tensor_name(multiple: int, kind: str, name: str) -> str:
    return f"{multiple}/{kind}/{name}"


def save_cases(path: Path, cases: Sequence[CanaryCase]) -> None:
    """Write the cases to a safetensors file at `path` (the caller makes it atomic)."""
    from safetensors.numpy import save_file

    tensors = {}
    for case in cases:
        for kind, arrays in (("in", case.inputs), ("out", case.outputs)):
            for name, a in arrays.items():
                tensors[tensor_name(case.multiple, kind, name)] = np.ascontiguousarray(a)
    save_file(tensors, str(path))


def load_cases(path: Path) -> list[CanaryCase]:
    from safetensors.numpy import load_file

    by_multiple: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for key, a in load_file(str(path)).items():
        m, kind, name = key.split("/", 2)
        ins, outs = by_multiple.setdefault(int(m), ({}, {}))
        (ins if kind == "in" else outs)[name] = a
    return [CanaryCase(m, ins, outs) for m, (ins, outs) in sorted(by_multiple.items())]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """|got - want| / |want| (L2 over the tensor, in float64); infinite where `got` is not finite."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        raise ValueError(f"canary: output of shape {g.shape}, recorded {w.shape}")
    if not np.isfinite(g).all():
        return math.inf
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(g - w)) / (norm if norm > 0 else 1.0)


def bound(precision: str) -> float:
    if precision not in BOUNDS:
        raise ValueError(f"no canary bound for precision {precision!r}")
    return BOUNDS[precision]


@dataclass(frozen=True)
class CanaryResult:
    """The worst output of a graph's canary: which call and tensor, its error, the bound."""

    graph: str
    precision: str
    error: float
    bound: float
    where: str  # "unet x3 eps"
    seconds: float = 0.0
    failure: str = ""  # the engine's own error, where it raised instead of computing

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def describe(self) -> str:
        if self.failure:
            return f"{self.where}: {self.failure}"
        err = "non-finite output" if math.isinf(self.error) else f"relative error {self.error:.2g}"
        return f"{self.where}: {err} against the recorded fp32 output (bound {self.bound:g} at {self.precision})"


__all__ = ["BOUNDS", "CANARY_DIR", "CanaryCase", "CanaryResult", "GraphShape", "bound", "canary_file", "canary_key",
           "canary_slot", "conditioning", "load_cases", "make_inputs", "multiples", "relative_error", "routing",
           "save_cases", "tensor_name"]
