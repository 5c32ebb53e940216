#!/usr/bin/env python3
"""The public code with what a user tries first for speed: tomesd (token merging) and DeepCache's helper.

Usage (the packages are not r2r's dependencies)::

    pip install tomesd DeepCache
    python tools/public_code_packages.py

Runs the `public-code` baseline of r2r-bench on the embedded default (two procedural renders at 256x256, one warm-up
image) as it is, with `tomesd.apply_patch(unet, ratio)` and with `DeepCacheSDHelper` enabled on its UNet; prints
seconds per image, the speed-up and the PSNR of each output against the plain public code's, or how it fails.
"""

from __future__ import annotations

import time
import traceback
import types
from collections.abc import Callable

import numpy as np

from r2r.benchmarks.public_code import PublicCodePipeline
from r2r.config import Method
from r2r.metrics import psnr
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, Components, load_components
from r2r.training.data import render_pair, sample_design

W = H = 256
Setup = Callable[[Components], None]


def tome(ratio: float) -> Setup:
    def setup(comps: Components) -> None:
        import tomesd

        tomesd.apply_patch(comps.unet, ratio=ratio)

    return setup


def deepcache(interval: int) -> Setup:
    def setup(comps: Components) -> None:
        from DeepCache import DeepCacheSDHelper
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_pretrained(EMBEDDED_DEFAULT / "scheduler")  # the script's scheduler
        scheduler.set_timesteps(50)
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=comps.unet, scheduler=scheduler))
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()

    return setup


def main() -> None:
    renders = [render_pair(sample_design(np.random.default_rng([13, i]), (W, H)), (W, H))[0] for i in range(2)]
    method = Method()

    def run(setup: Setup | None) -> tuple[list[np.ndarray], float]:
        comps = load_components(EMBEDDED_DEFAULT)
        pipe = PublicCodePipeline(comps, EMBEDDED_DEFAULT / EMBEDDING_FILE, W, H)
        if setup is not None:
            setup(comps)
        pipe(renders[:1], method)  # warm-up
        t0 = time.perf_counter()
        out = pipe(renders, method)
        return out, (time.perf_counter() - t0) / len(renders)

    base, seconds = run(None)
    print(f"public code: {seconds:.3f} s/image")
    for name, setup in (("tomesd ratio 0.3", tome(0.3)), ("tomesd ratio 0.5", tome(0.5)),
                        ("DeepCache interval 2", deepcache(2)), ("DeepCache interval 3", deepcache(3))):
        try:
            out, s = run(setup)
        except Exception as exc:  # what a user meets: reported, not hidden
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"public code + {name}: fails: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})")
            continue
        dbs = ", ".join(f"{psnr(a, b):.1f}" for a, b in zip(out, base, strict=True))
        print(f"public code + {name}: {s:.3f} s/image ({seconds / s:.2f}x), PSNR vs the public code {dbs} dB")


if __name__ == "__main__":
    main()
