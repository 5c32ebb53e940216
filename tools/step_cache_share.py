#!/usr/bin/env python3
"""What step caching can save on a UNet: the shallow path's time against a whole call, PyTorch eager, one latent.

Usage::

    python tools/step_cache_share.py --sd15 --size 512x512 --size 768x1024 --attention-pool 1 --attention-pool 4

A shallow call replaces K - 1 of every K whole calls, so with a shallow path at a fraction s of a whole call the
UNet time falls at most by K / (1 + (K - 1) s). The UNet is the embedded default's, or with `--sd15` the SD 1.5
architecture with seeded random weights (nothing is downloaded), in bf16 (`--dtype`); the TAC plan of divisor 256 is
installed with the attention pool given. This is an analysis of where a call's time goes, not a speed report:
speed comes from `r2r-bench run`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r2r.models import EMBEDDED_DEFAULT, SD15_UNET_CONFIG, load_components
from r2r.step_cache import unet_split
from r2r.tac import install_tac, plan_tac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", action="store_true", help="The SD 1.5 architecture (random weights).")
    parser.add_argument("--size", action="append", default=None, help="WxH (repeatable) [default: 256x256].")
    parser.add_argument("--attention-pool", type=int, action="append", default=None, help="[default: 1]")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    if args.sd15:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().to(dtype)
    else:
        unet = load_components(EMBEDDED_DEFAULT).unet.eval().to(dtype)
    cfg = unet.config
    for size in args.size or ["256x256"]:
        w, h = (int(v) for v in size.split("x"))
        for pool in args.attention_pool or [1]:
            install_tac(unet, plan_tac(cfg, w, h, 256, pool))
            x = torch.randn(1, cfg.in_channels, h // 8, w // 8, dtype=dtype)
            t = torch.tensor([261.0])
            ehs = torch.randn(1, 77, cfg.cross_attention_dim, dtype=dtype)
            times: dict[str, list[float]] = {"whole": [], "shallow": []}
            with torch.no_grad():
                _, deep = unet_split(unet, x, t, ehs)  # warm-up
                for _ in range(args.repeats):
                    for kind, given in (("whole", None), ("shallow", deep)):
                        t0 = time.perf_counter()
                        unet_split(unet, x, t, ehs, given)
                        times[kind].append(time.perf_counter() - t0)
            whole, shallow = statistics.median(times["whole"]), statistics.median(times["shallow"])
            s = shallow / whole
            bounds = ", ".join(f"K={k} at most {k / (1 + (k - 1) * s):.2f}x" for k in (2, 3))
            print(f"{size} pool {pool}: whole {whole:.2f} s, shallow {shallow:.2f} s ({s:.0%}); {bounds}", flush=True)


if __name__ == "__main__":
    main()
