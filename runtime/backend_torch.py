"""PyTorch backend of the coupled scheduler: the model's own modules, on any torch device, the whole program replayed.

Same interface as the other backends: `empty` is the only allocation; UNet calls run r2r's TAC processor in the
graph's mode; fp32, fp16 or bf16 weights, float32 buffers. On CUDA a program runs once eagerly, then as one
`torch.cuda.CUDAGraph` replay; on CPU in order. The model must match the hash the bundle recorded.
Why: docs/design.md, "Backends".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r2r import graph_io
from r2r.manifest import BundleError
from r2r.models import load_components, sha256_tree
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend, Buffers, Coefficients, DeviceArray, Op
from r2r.step_cache import unet_split
from r2r.tac import TACMode, install_tac, plan_tac

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_NUMPY = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64"}


class TorchBackend(Backend):
    """The bundle's program on the model's PyTorch modules, on `device` ("cpu", "cuda", "cuda:1", ...)."""

    name = "torch"

    def __init__(self, bundle: Bundle, model_dir: Path, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0, cuda_graph: bool = True) -> None:
        import torch

        if precision not in DTYPES:
            raise ValueError(f"torch precision {precision!r}: choose {', '.join(DTYPES)}")
        recorded = bundle.manifest.source.get("model_sha256")
        if recorded is not None and recorded != sha256_tree(model_dir):
            raise BundleError(f"{model_dir} is not the model the bundle {bundle.root} was exported from; pass that "
                              "model with --model, or export a bundle of this one")
        self.torch, self.bundle, self.precision = torch, bundle, precision
        self.device = torch.device(device)
        self.dtype = getattr(torch, DTYPES[precision])
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        comps = load_components(model_dir, device=self.device, dtype=self.dtype)  # weights cast once
        self.unet, self.vae = comps.unet, comps.vae
        self.scaling_factor = comps.scaling_factor
        plan = plan_tac(comps.unet.config, bundle.width, bundle.height, bundle.manifest.tac_plan["divisor"],
                        bundle.attention_pool)
        if [lyr.name for lyr in plan.layers] != [lyr["name"] for lyr in bundle.tac_layers]:
            raise BundleError(f"{bundle.root}: the model's TAC layers are not the bundle's; re-export the bundle")
        self.state = install_tac(self.unet, plan)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.frees_dropped_buffers = not self.cuda_graph  # captured programs hold their buffers
        self.reports_steps = not self.cuda_graph
        self.buffers = Buffers()  # base address -> tensor
        self.allocations = 0  # tensors made by empty(); a program must not add any
        self._graphs: dict[object, tuple[Sequence[Op], Any]] = {}
        self._stream = torch.cuda.Stream(self.device) if self.cuda_graph else None

    def precision_of(self, graph: str) -> str:
        """fp32 convolutions on CUDA run in TF32 (cuDNN's default in torch)."""
        return "tf32" if self.precision == "fp32" and self.device.type == "cuda" else self.precision

    # -- memory ----------------------------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> DeviceArray:
        dt = np.dtype(dtype)
        if dt not in _NUMPY:
            raise ValueError(f"torch backend buffers of {dt} are not supported (float32, int64)")
        t = self.torch.zeros(tuple(int(s) for s in shape), dtype=getattr(self.torch, _NUMPY[dt]), device=self.device)
        self.allocations += 1
        self.buffers.add(t.data_ptr(), t.numel() * t.element_size(), t)
        return DeviceArray(t.data_ptr(), tuple(t.shape), dt, None)

    def tensor(self, a: DeviceArray) -> Any:
        """The tensor view behind a device array (resolved when a call is prepared, never inside a program)."""
        found = self.buffers.owner(a) if isinstance(a, DeviceArray) else None
        if found is None:
            raise ValueError(f"{a!r} is not memory of this torch backend (make buffers with its empty())")
        base, whole = found
        start = (a.ptr - base) // whole.element_size()
        return whole.view(-1)[start:start + int(np.prod(a.shape))].view(a.shape)

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        t = self.tensor(dst)
        t.copy_(self.torch.from_numpy(np.ascontiguousarray(np.asarray(src).reshape(dst.shape), dtype=dst.dtype)))

    def download(self, src: DeviceArray) -> np.ndarray:
        return self.tensor(src).cpu().numpy().copy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    # -- prepared calls --------------------------------------------------------------------------------------------
    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        torch, dt = self.torch, self.dtype
        t = {name: self.tensor(a) for name, a in bindings.items()}
        if graph == graph_io.VAE_ENCODER:
            image, latent, sf, vae = t[graph_io.IMAGE], t[graph_io.LATENT], self.scaling_factor, self.vae

            def encode() -> None:
                latent.copy_(vae.encode(image.to(dt)).latent_dist.mean * sf)

            return _no_grad(torch, encode)
        if graph == graph_io.VAE_DECODER:
            latent, image, sf, vae = t[graph_io.LATENT], t[graph_io.IMAGE], self.scaling_factor, self.vae

            def decode() -> None:
                image.copy_((vae.decode(latent.to(dt) / sf).sample / 2 + 0.5).clamp(0, 1))

            return _no_grad(torch, decode)
        if graph not in (*graph_io.UNET_GRAPHS, *graph_io.STEP_CACHE_GRAPHS):
            runs = ", ".join((*graph_io.UNET_GRAPHS, *graph_io.STEP_CACHE_GRAPHS, graph_io.VAE_ENCODER,
                              graph_io.VAE_DECODER))
            raise KeyError(f"the torch backend runs {runs}; "
                           f"not {graph}")
        return _no_grad(torch, self._unet(graph, t))

    def _unet(self, graph: str, t: dict[str, Any]) -> Callable[[], None]:
        unet, state, dt = self.unet, self.state, self.dtype
        sample, timestep = t[graph_io.SAMPLE], t[graph_io.TIMESTEP]
        ehs, eps = t[graph_io.ENCODER_HIDDEN_STATES], t[graph_io.EPS]
        names = graph_io.tac_names(len(self.bundle.tac_layers))
        qk = [t[n] for n in names if n in t]
        pairs = [(qk[2 * i], qk[2 * i + 1]) for i in range(len(qk) // 2)]
        flat = [(q.view(q.shape[0], -1, q.shape[-1]), k.view(k.shape[0], -1, k.shape[-1])) for q, k in pairs]

        def run() -> Any:
            return unet(sample.to(dt), timestep, encoder_hidden_states=ehs.to(dt)).sample

        if graph == graph_io.UNET:
            src = t[graph_io.TAC_SRC]

            def routed() -> None:
                with state.routed(src):
                    eps.copy_(run())

            return routed
        if graph in graph_io.STEP_CACHE_GRAPHS:  # step caching: the split UNet, routed (r2r.step_cache)
            src, deep = t[graph_io.TAC_SRC], t[graph_io.DEEP]
            shallow = graph == graph_io.UNET_SHALLOW

            def split() -> None:
                with state.routed(src):
                    out, features = unet_split(unet, sample.to(dt), timestep, ehs.to(dt),
                                               deep.to(dt) if shallow else None)
                eps.copy_(out)
                if not shallow:
                    deep.copy_(features)

            return split
        if graph == graph_io.UNET_EMIT:

            def emit() -> None:
                state.mode = TACMode.CAPTURE
                try:
                    eps.copy_(run())
                    for (q, k), (qo, ko) in zip(state.take_captured(), pairs, strict=True):
                        qo.view(q.shape).copy_(q)  # [B, h_l, w_l, C] buffers hold the [B, N, C] tokens
                        ko.view(k.shape).copy_(k)
                finally:
                    state.mode = TACMode.OFF

            return emit
        injected = [(q.to(dt), k.to(dt)) for q, k in flat] if dt != self.torch.float32 else flat

        def inject() -> None:
            if dt != self.torch.float32:
                for (q, k), (qc, kc) in zip(flat, injected, strict=True):
                    qc.copy_(q)
                    kc.copy_(k)
            state.mode, state.injected = TACMode.INJECT, injected
            try:
                eps.copy_(run())
            finally:
                state.mode, state.injected = TACMode.OFF, ()

        return inject

    # -- scheduler updates: the host backends' float32 order of operations -----------------------------------------
    def ddim(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
             coef_dev: DeviceArray) -> Op:
        d, a, e = self.tensor(dst), self.tensor(z), self.tensor(eps)
        tmp = self.torch.empty_like(e)  # prepared once, outside the program
        self.allocations += 1
        mul = self.torch.mul
        cz, ce = float(np.float32(coef.cz)), float(np.float32(coef.ce))

        def op() -> None:
            mul(a, cz, out=d)
            mul(e, ce, out=tmp)
            d.add_(tmp)

        return op

    def guided(self, dst_pair: DeviceArray, z: DeviceArray, eps_pair: DeviceArray, coef: Coefficients,
               coef_dev: DeviceArray) -> Op:
        return self._guided(dst_pair, z, eps_pair, coef, None)

    def guided_text(self, dst_group: DeviceArray, z: DeviceArray, eps_group: DeviceArray, coef: Coefficients,
                    coef_dev: DeviceArray, w_text: DeviceArray) -> Op:
        return self._guided(dst_group, z, eps_group, coef, w_text)

    def _guided(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
                w_text: DeviceArray | None) -> Op:
        """The host backends' order of operations (runtime.device.NumpyArithmetic._guided)."""
        torch = self.torch
        b = z.shape[0]
        d, a, g = self.tensor(dst), self.tensor(z), self.tensor(eps)
        e_neg, e_null = g[:b], g[b : 2 * b]
        blocks = [d[k * b : (k + 1) * b] for k in range(d.shape[0] // b)]
        tmp = torch.empty_like(a)
        self.allocations += 1
        text = None
        if w_text is not None:
            text = (g[2 * b :], self.tensor(w_text).view(-1, *([1] * (a.dim() - 1))), torch.empty_like(a))
            self.allocations += 1
        cz, ce, w = (float(np.float32(v)) for v in (coef.cz, coef.ce, coef.w))

        def op() -> None:
            torch.sub(e_null, e_neg, out=tmp)
            tmp.mul_(w)
            tmp.add_(e_neg)
            if text is not None:
                e_text, wt, tmp2 = text
                torch.sub(e_text, e_null, out=tmp2)
                tmp2.mul_(wt)
                tmp.add_(tmp2)
            torch.mul(a, cz, out=blocks[0])
            tmp.mul_(ce)
            blocks[0].add_(tmp)
            for blk in blocks[1:]:
                blk.copy_(blocks[0])

        return op

    def copy(self, dst: DeviceArray, src: DeviceArray) -> Op:
        d, s = self.tensor(dst), self.tensor(src)

        def op() -> None:
            d.copy_(s)

        return op

    # -- programs --------------------------------------------------------------------------------------------------
    def execute(self, program: Sequence[Op], key: object) -> None:
        """CPU: the ops in order. CUDA: the first run of a program is eager on a side stream, then the program is
        captured into one CUDA graph; every later run of it is one replay."""
        if not self.cuda_graph:
            for op in program:
                op()
            return
        torch = self.torch
        held = self._graphs.get(key)
        if held is not None and held[0] is program:
            held[1].replay()
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for op in program:  # warm-up, and this batch's result
                op()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            for op in program:
                op()
        self._graphs[key] = (program, graph)

    def close(self) -> None:
        self.synchronize()
        self._graphs.clear()
        self.buffers.clear()

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "torch": self.torch.__version__, "cuda_graphs": "per program" if self.cuda_graph else "off"}


def _no_grad(torch: Any, fn: Callable[[], None]) -> Op:
    def op() -> None:
        with torch.inference_mode():
            fn()

    return op


def open_backend(bundle: Bundle, device: str, precision: str, threads: int = 0, model: Path | None = None) -> Backend:
    """The backend table's runtime entry: needs the bundle's model directory."""
    if model is None:
        raise ValueError("the torch backend runs the model's own modules: pass --model (the bundle's model)")
    return TorchBackend(bundle, model, device, precision, threads)


__all__ = ["DTYPES", "TorchBackend", "open_backend"]
