"""One benchmark configuration, run in its own process so that its peak RSS is its own.

`python -m r2r.benchmarks.worker CONFIG.json RESULT.json`: loads the pipeline, runs one instrumented
pass (UNet evaluations counted as they execute), a warm-up, then `repeats` timed passes over the
images in batches, timing each stage; writes the timings, counts, peak RSS and the outputs.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from r2r.config import Method
from r2r.machine import peak_rss_mb
from r2r.runtime.scheduler import STAGES


@dataclass
class BenchConfig:
    name: str
    kind: str  # public-code | torch-reference | r2r
    model: str
    embedding: str
    width: int
    height: int
    images: str  # .npz with an "images" uint8 [N, H, W, 3] array
    outputs: str  # .npz written with the outputs of the last timed pass
    method: Method = field(default_factory=Method)
    bundle: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    inversion: str = "exact"
    fused: bool = True  # the TAC step as one routed UNet call (exact inversion only)
    batch: int = 1
    repeats: int = 3
    threads: int = 0
    warmup: bool = True
    default: bool = False  # the configuration r2r-run runs by default on this machine

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):  # read back from its JSON file
            self.method = Method(**self.method)


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    def run(self, stage: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.stages[stage] += time.perf_counter() - t0
        return out


def _torch_runner(cfg: BenchConfig) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    from r2r.models import load_components

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    comps = load_components(cfg.model)
    m = cfg.method
    if cfg.kind == "public-code":
        from r2r.benchmarks.public_code import PublicCodePipeline

        pipe = PublicCodePipeline(comps, cfg.embedding, cfg.width, cfg.height, m.divisor)

        def batch_fn(images: list[np.ndarray], timer: _Timer) -> list[np.ndarray]:
            outs = []
            for img in images:  # the script's one image at a time
                pipe.images += 1
                z0 = timer.run("encode", pipe.encode, img)
                inv = timer.run("inversion", pipe.invert, z0, m)
                zr = timer.run("generation", pipe.generate, inv, m)
                outs.append(timer.run("decode", pipe.decode, zr))
            return outs

        return batch_fn, lambda: pipe.evaluations / max(pipe.images, 1), {}

    from r2r.reference import ReferencePipeline

    ref = ReferencePipeline(comps, cfg.embedding, cfg.width, cfg.height)

    def batch_fn(images: list[np.ndarray], timer: _Timer) -> list[np.ndarray]:
        ref.count.images += len(images)
        sched = ref.schedule(m)
        z0 = timer.run("encode", ref.encode, images)
        lat = timer.run("inversion", ref.invert, z0, sched)
        zr = timer.run("generation", ref.generate, lat, sched, m)
        return timer.run("decode", ref.decode, zr)

    return batch_fn, lambda: ref.count.per_image, {}


def _r2r_runner(cfg: BenchConfig) -> tuple[Any, Any, dict[str, Any]]:
    from r2r.config import Inversion
    from r2r.imageio import from_model_output, to_model_input
    from r2r.runtime.assembly import RunConfig
    from r2r.runtime.translator import Translator

    if cfg.bundle is None:
        raise ValueError(f"{cfg.name}: an r2r configuration runs a bundle; none given")
    runtime = Translator.from_config(RunConfig(
        engine=Path(cfg.bundle), backend=cfg.backend, precision=cfg.precision, batch=cfg.batch, method=cfg.method,
        inversion=cast(Inversion, cfg.inversion), fused="on" if cfg.fused else "off", threads=cfg.threads)).runtime
    sched, backend = runtime.scheduler, runtime.backend
    assert sched is not None and backend is not None
    ops, stages = sched.plan.ops, sched.plan.stages
    counted = {"evaluations": 0, "images": 0}

    def instrumented(images: list[np.ndarray]) -> None:
        backend.upload(sched.image_in, np.stack([to_model_input(im) for im in images]))
        for i, op in enumerate(ops):
            op()
            counted["evaluations"] += sched.plan.unet_ops.get(i, 0) * len(images)
        counted["images"] += len(images)

    def batch_fn(images: list[np.ndarray], timer: _Timer) -> list[np.ndarray]:
        if not counted["images"] and cfg.warmup:  # the warm-up pass counts; without one, the plan's count stands
            instrumented(images)
        backend.upload(sched.image_in, np.stack([to_model_input(im) for im in images]))
        for stage in STAGES:
            part = ops[stages[stage]]
            timer.run(stage, lambda p=part, s=stage: (backend.execute(p, key=(id(sched), s)), backend.synchronize()))
        out = backend.download(sched.image_out)
        return [from_model_output(out[i]) for i in range(len(images))]

    canary = {"canary_s": runtime.verified.seconds} if runtime.verified is not None else {}
    return batch_fn, lambda: (counted["evaluations"] / counted["images"] if counted["images"]
                              else float(sched.unet_evaluations_per_image)), canary


def run(cfg: BenchConfig) -> dict[str, Any]:
    images = list(np.load(cfg.images)["images"])
    if len(images) % cfg.batch:
        raise ValueError(f"{len(images)} images do not split into batches of {cfg.batch}")
    t_load = time.perf_counter()
    batch_fn, evals, opened = (_r2r_runner if cfg.kind == "r2r" else _torch_runner)(cfg)
    load_s = time.perf_counter() - t_load
    batches = [images[i : i + cfg.batch] for i in range(0, len(images), cfg.batch)]
    if cfg.warmup:
        batch_fn(batches[0], _Timer())  # warm-up (and, for r2r, the instrumented pass)
    passes, outputs = [], []
    for _ in range(cfg.repeats):
        timer = _Timer()
        outputs = []
        t0 = time.perf_counter()
        for chunk in batches:
            outputs.extend(batch_fn(chunk, timer))
        wall = time.perf_counter() - t0
        passes.append({"wall_s": wall, "images": len(images),
                       "per_image_s": {k: v / len(images) for k, v in timer.stages.items()}})
    np.savez_compressed(cfg.outputs, images=np.stack(outputs))
    return {"config": asdict(cfg), "load_s": load_s, **opened, "passes": passes, "unet_evaluations_per_image": evals(),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    cfg = BenchConfig(**json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
