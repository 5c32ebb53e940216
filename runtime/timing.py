"""Start-up measurement: is one unet_fused call faster than unet_emit + unet_inject on this backend?"""

from __future__ import annotations

import time

from r2r import graph_io as io
from r2r.config import MethodConfig
from r2r.runtime.bundle import Bundle


def fused_is_faster(bundle: Bundle, backend_name: str, precision: str, batch: int, method: MethodConfig,
                    repeats: int = 3, device: str = "auto") -> bool:
    """Time both ways of one TAC step on scratch buffers (min of `repeats` after a warm-up)."""
    from r2r.runtime.select import make_backend

    be = make_backend(backend_name, bundle, precision, device)
    c, h, w = bundle.latent_shape
    d = bundle.c_null.shape[-1]
    b = batch
    t = be.empty((1,))
    qk = [be.empty((b, lyr["tokens"], lyr["channels"])) for lyr in bundle.tac_layers for _ in (0, 1)]
    names = io.tac_names(len(bundle.tac_layers))
    emit = be.call(io.UNET_EMIT, {io.SAMPLE: be.empty((b, c, h, w)), io.TIMESTEP: t,
                                  io.ENCODER_HIDDEN_STATES: be.empty((b, 77, d)), io.EPS: be.empty((b, c, h, w)),
                                  **dict(zip(names, qk, strict=True))})
    inject = be.call(io.UNET_INJECT, {io.SAMPLE: be.empty((2 * b, c, h, w)), io.TIMESTEP: t,
                                      io.ENCODER_HIDDEN_STATES: be.empty((2 * b, 77, d)),
                                      io.EPS: be.empty((2 * b, c, h, w)), **dict(zip(names, qk, strict=True))})
    fused = be.call(io.UNET_FUSED, {io.SAMPLE: be.empty((3 * b, c, h, w)), io.TIMESTEP: t,
                                    io.ENCODER_HIDDEN_STATES: be.empty((3 * b, 77, d)),
                                    io.EPS: be.empty((3 * b, c, h, w))})

    def best(ops: list) -> float:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            be.execute(ops, key=("fused-probe", id(ops)))
            be.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    try:
        return best([fused]) < best([emit, inject])
    finally:
        close = getattr(be, "close", None)  # device backends hold a stream and device memory
        if close is not None:
            close()
