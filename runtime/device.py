"""The backend interface of the coupled scheduler: device arrays, prepared calls, programs.

A backend allocates every buffer once, binds graphs to buffers by name once (a prepared call), and
runs a program: the flat list of prepared calls and scheduler updates for one batch of images.
Nothing in a program allocates, copies Q/K or synchronizes with the host.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from r2r import graph_io

if TYPE_CHECKING:
    from r2r.runtime.bundle_reader import Bundle

Op = Callable[[], None]


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in a backend's memory: `ptr` is its address; `host` is that memory itself on CPU
    backends, None on GPU backends (real or simulated)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    host: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, index: int | slice) -> DeviceArray:
        """A view along the first axis (no copy): an int drops the axis, a slice keeps it."""
        n = self.shape[0]
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(index)
            i = index % n
            host = self.host[i] if self.host is not None else None
            return DeviceArray(self.ptr + i * row, self.shape[1:], self.dtype, host)
        start, stop, step = index.indices(n)
        if step != 1:
            raise ValueError("device views are contiguous slices")
        host = self.host[start:stop] if self.host is not None else None
        return DeviceArray(self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype, host)


class Buffers:
    """The memory a device backend allocated, by base address: a buffer or any view into one is recognised as the
    backend's own (and its owner found) before its address is bound or copied, since a wrong address on a device
    is silent corruption, not an exception."""

    def __init__(self) -> None:
        self._size: dict[int, int] = {}
        self._handle: dict[int, Any] = {}
        self._bases: list[int] = []

    def add(self, ptr: int, nbytes: int, handle: Any = None) -> None:
        self._size[ptr], self._handle[ptr] = nbytes, handle
        bisect.insort(self._bases, ptr)

    def owner(self, a: DeviceArray) -> tuple[int, Any] | None:
        """(base address, handle) of the allocation holding all of `a`, or None."""
        i = bisect.bisect_right(self._bases, a.ptr) - 1
        if i < 0:
            return None
        base = self._bases[i]
        return (base, self._handle[base]) if a.ptr + a.nbytes <= base + self._size[base] else None

    def __contains__(self, a: DeviceArray) -> bool:
        return self.owner(a) is not None

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._bases))

    def __len__(self) -> int:
        return len(self._bases)

    def clear(self) -> None:
        self._size.clear()
        self._handle.clear()
        self._bases.clear()


@dataclass(frozen=True)
class Coefficients:
    """One scheduler update: z' = cz z + ce e, with e = e_neg + w (e_null - e_neg) when guided."""

    cz: float
    ce: float
    w: float = 1.0


class Backend(ABC):
    """What the coupled scheduler needs from an execution engine."""

    name: str = "abstract"
    precision: str = "fp32"
    # Whether a scheduler's buffers are freed when it is dropped (host memory), so that the runtime may drop the
    # schedulers of sizes it has not seen lately; a device backend's memory stays its own until it closes.
    frees_dropped_buffers: bool = True
    # Whether a program may be run in pieces (per denoising step, for progress) at no cost: backends that run the ops
    # one by one; not one that replays the whole program as a CUDA graph.
    reports_steps: bool = False

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> DeviceArray: ...

    @abstractmethod
    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        """Host -> device, outside the denoising loop."""

    @abstractmethod
    def download(self, src: DeviceArray) -> np.ndarray:
        """Device -> host, outside the denoising loop (waits for the work that writes `src`)."""

    @abstractmethod
    def call(self, graph: str, bindings: Mapping[str, DeviceArray]) -> Op:
        """Bind every input and output of `graph` to buffers, once; the returned op runs it."""

    @abstractmethod
    def ddim(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
             coef_dev: DeviceArray) -> Op:
        """dst = cz z + ce eps. `coef_dev` holds (cz, ce, w) on the device for backends that need it."""

    @abstractmethod
    def guided(self, dst_pair: DeviceArray, z: DeviceArray, eps_pair: DeviceArray, coef: Coefficients,
               coef_dev: DeviceArray) -> Op:
        """e = e_neg + w (e_null - e_neg); dst_pair = [cz z + ce e, same]."""

    @abstractmethod
    def guided_text(self, dst_group: DeviceArray, z: DeviceArray, eps_group: DeviceArray, coef: Coefficients,
                    coef_dev: DeviceArray, w_text: DeviceArray) -> Op:
        """With text rows (docs/design.md, "Prompts"): e = e_neg + w (e_null - e_neg) + w_t (e_text - e_null), w_t
        per image from `w_text` [B]; dst_group = [cz z + ce e, same, same]."""

    @abstractmethod
    def copy(self, dst: DeviceArray, src: DeviceArray) -> Op:
        """Device-to-device copy of a latent (the [z, z] batch at the start of generation)."""

    def precision_of(self, graph: str) -> str:
        """The precision `graph` runs at (its canary's bound; r2r/canary.py)."""
        return self.precision

    def canary_size(self, bundle: Bundle, graph: str) -> tuple[int, int]:
        """The size (W, H) of the canary `graph` is checked with: the bundle's smallest."""
        lo = bundle.manifest.sizes["min"]
        return int(lo[0]), int(lo[1])

    def discard(self, graph: str) -> str:
        """Drop `graph`'s opened form and any artefact cached for it, so that the next call opens it afresh (after a
        missed canary, runtime/verify.py); returns what was dropped, for the message."""
        return ""

    def execute(self, program: Sequence[Op], key: object) -> None:
        """Run a program. CPU backends call the ops in order; a CUDA backend captures it once per key."""
        for op in program:
            op()

    def synchronize(self) -> None:  # noqa: B027 - synchronous backends have nothing to wait for
        """Wait for all enqueued work."""

    def describe(self) -> dict[str, str]:
        return {"backend": self.name}


class StepGraphBackend(Backend):
    """A backend whose memory the host cannot touch: the scheduler updates are the bundle's `ddim_step` /
    `guided_step` graphs, prepared like any call, with `coef` bound to the scheduler's device row (cz, ce, w), so
    the arithmetic stays on the device and no host scalar enters the loop."""

    frees_dropped_buffers = False

    def ddim(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
             coef_dev: DeviceArray) -> Op:
        """dst = cz z + ce eps."""
        return self.call(graph_io.DDIM_STEP, {graph_io.Z: z, graph_io.EPS: eps, graph_io.COEF: coef_dev,
                                              graph_io.Z_NEXT: dst})

    def guided(self, dst_pair: DeviceArray, z: DeviceArray, eps_pair: DeviceArray, coef: Coefficients,
               coef_dev: DeviceArray) -> Op:
        """dst_pair = [z', z'], z' = cz z + ce (e_neg + w (e_null - e_neg))."""
        return self.call(graph_io.GUIDED_STEP, {graph_io.Z: z, graph_io.EPS: eps_pair, graph_io.COEF: coef_dev,
                                                graph_io.Z_PAIR: dst_pair})

    def guided_text(self, dst_group: DeviceArray, z: DeviceArray, eps_group: DeviceArray, coef: Coefficients,
                    coef_dev: DeviceArray, w_text: DeviceArray) -> Op:
        """dst_group = [z', z', z'], the two-term guidance with each image's w_t read on the device."""
        return self.call(graph_io.GUIDED_TEXT_STEP, {graph_io.Z: z, graph_io.EPS: eps_group, graph_io.COEF: coef_dev,
                                                     graph_io.W_TEXT: w_text, graph_io.Z_GROUP: dst_group})


class NumpyArithmetic:
    """The scheduler updates as in-place numpy ufuncs: float32, the step graphs' order of operations,
    no allocation (every result goes to a preallocated `out`)."""

    def __init__(self, scratch: Callable[[tuple[int, ...]], np.ndarray]) -> None:
        self._scratch = scratch

    def ddim(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients) -> Op:
        d, a, e = dst.host, z.host, eps.host
        tmp = self._scratch(e.shape)
        cz, ce = np.float32(coef.cz), np.float32(coef.ce)
        mul, add = np.multiply, np.add

        def op() -> None:
            mul(a, cz, out=d)
            mul(e, ce, out=tmp)
            add(d, tmp, out=d)

        return op

    def guided(self, dst_pair: DeviceArray, z: DeviceArray, eps_pair: DeviceArray, coef: Coefficients) -> Op:
        return self._guided(dst_pair, z, eps_pair, coef, None)

    def guided_text(self, dst_group: DeviceArray, z: DeviceArray, eps_group: DeviceArray, coef: Coefficients,
                    w_text: DeviceArray) -> Op:
        """guided_text_step's order of operations: e = e_neg + w (e_null - e_neg), then e + w_t (e_text - e_null)
        with w_t per image (read from `w_text` at each run: a batch's prompts change it, not the program)."""
        return self._guided(dst_group, z, eps_group, coef, w_text)

    def _guided(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
                w_text: DeviceArray | None) -> Op:
        """Eq. 8 (and with `w_text`, the text term) then the update, into every block of `dst`; without text rows the
        operations are eq. 8's alone (today's numbers)."""
        b = z.shape[0]
        d, a, g = dst.host, z.host, eps.host
        e_neg, e_null = g[:b], g[b : 2 * b]
        blocks = [d[k * b : (k + 1) * b] for k in range(d.shape[0] // b)]
        tmp = self._scratch(a.shape)
        text = None
        if w_text is not None:  # prepared once: the text term's scratch and the weights' view
            text = (g[2 * b :], w_text.host.reshape(-1, *([1] * (a.ndim - 1))), np.empty(a.shape, np.float32))
        cz, ce, w = np.float32(coef.cz), np.float32(coef.ce), np.float32(coef.w)
        mul, add, sub, copyto = np.multiply, np.add, np.subtract, np.copyto

        def op() -> None:
            sub(e_null, e_neg, out=tmp)
            mul(tmp, w, out=tmp)
            add(e_neg, tmp, out=tmp)
            if text is not None:
                e_text, wt, tmp2 = text
                sub(e_text, e_null, out=tmp2)
                mul(tmp2, wt, out=tmp2)
                add(tmp, tmp2, out=tmp)
            mul(a, cz, out=blocks[0])
            mul(tmp, ce, out=tmp)
            add(blocks[0], tmp, out=blocks[0])
            for blk in blocks[1:]:
                copyto(blk, blocks[0])

        return op


class HostBackend(Backend):
    """A backend whose device memory is host memory (CPU runtimes): buffers are numpy arrays, the
    scheduler updates are in-place ufuncs, copies are np.copyto. Subclasses provide `call`."""

    reports_steps = True

    def __init__(self) -> None:
        self._scratch: dict[tuple[int, ...], np.ndarray] = {}
        self._arith = NumpyArithmetic(self._scratch_for)
        # (graph, binding, buffers): bindings and the buffers they point at live as long as the backend (or until the
        # graph is discarded)
        self._keep: list[tuple[Any, ...]] = []

    def _scratch_for(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self._scratch:
            self._scratch[shape] = np.empty(shape, np.float32)
        return self._scratch[shape]

    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> DeviceArray:
        arr = np.zeros(tuple(shape), dtype)
        return DeviceArray(arr.ctypes.data, arr.shape, arr.dtype, arr)

    def upload(self, dst: DeviceArray, src: np.ndarray) -> None:
        np.copyto(dst.host, src.reshape(dst.shape), casting="same_kind")

    def download(self, src: DeviceArray) -> np.ndarray:
        return src.host.copy()

    def ddim(self, dst: DeviceArray, z: DeviceArray, eps: DeviceArray, coef: Coefficients,
             coef_dev: DeviceArray) -> Op:
        return self._arith.ddim(dst, z, eps, coef)

    def guided(self, dst_pair: DeviceArray, z: DeviceArray, eps_pair: DeviceArray, coef: Coefficients,
               coef_dev: DeviceArray) -> Op:
        return self._arith.guided(dst_pair, z, eps_pair, coef)

    def guided_text(self, dst_group: DeviceArray, z: DeviceArray, eps_group: DeviceArray, coef: Coefficients,
                    coef_dev: DeviceArray, w_text: DeviceArray) -> Op:
        return self._arith.guided_text(dst_group, z, eps_group, coef, w_text)

    def copy(self, dst: DeviceArray, src: DeviceArray) -> Op:
        d, s = dst.host, src.host

        def op() -> None:
            np.copyto(d, s)

        return op
