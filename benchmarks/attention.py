"""Where a UNet call's time and memory go in attention, per engine: `r2r-bench attention`.

One routed-UNet call on the fused TAC step's batch [cg, neg, null] (3 latents), profiled by the engine itself:
ONNX Runtime's node profile (the bundle's graph, whose attention is the exported MatMul / Softmax / MatMul pattern,
against the ORT engine, whose attention is com.microsoft.MultiHeadAttention) and OpenVINO's per-node performance
counters (its CPU plugin fuses the pattern into one node per attention; the count of fused nodes against the
graph's Softmax count says whether every layer, the TAC layers with their routed Q/K included, was fused). Each
configuration runs in its own process: the peak RSS of the call above the loaded model is the memory the call's
activations take (the exported pattern materialises the [heads, N, N] score matrix).

`python -m r2r.benchmarks.attention CONFIG.json RESULT.json` is one configuration.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r2r.graph_io import eval_dim, shape_env
from r2r.machine import peak_rss_mb

CALL_BATCH = 3  # the fused TAC step of one image: [cg, neg, null]


@dataclass
class AttentionConfig:
    name: str
    engine: str  # onnxruntime | openvino
    graph: str  # the ONNX file to run
    width: int
    height: int
    multiple: int  # the bundle's pixel multiple: the graphs' spatial axes are multiples of height/multiple, ...
    precision: str = "fp32"
    threads: int = 0
    repeats: int = 3


def attention_nodes(onnx_path: str | Path) -> tuple[set[str], int, int]:
    """Names of the nodes of every attention (the exported pattern's scale Muls, MatMul, Softmax, MatMul; or one
    MultiHeadAttention), how many attentions there are, and how many of them are MultiHeadAttention nodes."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names: set[str] = set()
    count = mha = 0
    for n in graph.node:
        if n.op_type == "MultiHeadAttention":
            names.add(n.name)
            count, mha = count + 1, mha + 1
        if n.op_type != "Softmax":
            continue
        count += 1
        names.add(n.name)
        scores = producer.get(n.input[0])
        if scores is not None and scores.op_type == "MatMul":
            names.add(scores.name)
            names.update(p.name for i in scores.input if (p := producer.get(i)) is not None and p.op_type == "Mul")
        names.update(c.name for c in consumers.get(n.output[0], []) if c.op_type == "MatMul")
    return names, count, mha


def _feeds(cfg: AttentionConfig) -> dict[str, np.ndarray]:
    """Inputs of one call at the configured size, shaped by the graph's own dimension expressions (B, 4*hm, ...)."""
    import onnx

    env = shape_env(CALL_BATCH, cfg.width, cfg.height, cfg.multiple)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in onnx.load(cfg.graph, load_external_data=False).graph.input:
        name, kind = i.name, i.type.tensor_type.elem_type
        dims = [eval_dim(d.dim_param or d.dim_value, env) for d in i.type.tensor_type.shape.dim]
        if name == "tac_src":
            feeds[name] = np.array([0, 1, 0], np.int64)  # the null row takes the cg row's Q/K
        elif name == "timestep":
            feeds[name] = np.array([261.0], np.float32)
        elif kind == onnx.TensorProto.INT64:
            feeds[name] = np.zeros(dims, np.int64)
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _onnxruntime(cfg: AttentionConfig) -> dict[str, Any]:
    import onnxruntime as ort

    from r2r.engines.onnxruntime import session_options

    names, count, mha = attention_nodes(cfg.graph)
    so = session_options(ort, cfg.threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(cfg.graph).parent / f".profile-{cfg.name}")
    sess = ort.InferenceSession(cfg.graph, sess_options=so, providers=["CPUExecutionProvider"])
    feeds = _feeds(cfg)
    loaded = peak_rss_mb()
    runs = []
    for _ in range(cfg.repeats + 1):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink(missing_ok=True)
    node_us: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            node_us[node] = node_us.get(node, 0.0) + float(e["dur"])
    total = sum(node_us.values())
    attn = sum(us for node, us in node_us.items() if node in names)
    return {"attention_layers": count, "fused_attention_nodes": mha,
            "call_ms_min": min(runs[1:]) * 1e3, "attention_share": attn / total if total else 0.0,
            "rss_loaded_mb": loaded, "rss_peak_mb": peak}


def _openvino(cfg: AttentionConfig) -> dict[str, Any]:
    import openvino as ov

    from r2r.engines.openvino import compile_config, default_threads

    _, count, _ = attention_nodes(cfg.graph)
    core = ov.Core()
    config = {**compile_config(cfg.precision, cfg.threads or default_threads()), "PERF_COUNT": True}
    compiled = core.compile_model(cfg.graph, "CPU", config)
    req = compiled.create_infer_request()
    feeds = _feeds(cfg)
    loaded = peak_rss_mb()
    runs = []
    for _ in range(cfg.repeats + 1):
        t0 = time.perf_counter()
        req.infer(feeds)
        runs.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    # The CPU plugin fuses each attention (MatMul, Softmax, MatMul) into one node; its original layers say so.
    fused = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        original = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        if "softmax" in original.lower() and "matmul" in original.lower():
            fused.add(op.get_friendly_name())
    times = {p.node_name: p.real_time.total_seconds() for p in req.profiling_info}
    total = sum(times.values())
    attn = sum(t for n, t in times.items() if n in fused)
    return {"attention_layers": count, "fused_attention_nodes": len(fused), "call_ms_min": min(runs[1:]) * 1e3,
            "attention_share": attn / total if total else 0.0, "rss_loaded_mb": loaded, "rss_peak_mb": peak}


def run(cfg: AttentionConfig) -> dict[str, Any]:
    result = _onnxruntime(cfg) if cfg.engine == "onnxruntime" else _openvino(cfg)
    return {"config": asdict(cfg), **result, "call_peak_above_load_mb": result["rss_peak_mb"] - result["rss_loaded_mb"]}


def main() -> None:
    cfg = AttentionConfig(**json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
