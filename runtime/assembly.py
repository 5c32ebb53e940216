"""One runtime assembly: `open_runtime(RunConfig)` is how `r2r-run` and `r2r-bench` get a translator.

It resolves, once and in this order: the bundle (the one given, or the model's, exported into the cache), the
method (the bundle's defaults under the flags given), the program's variant, the backend row, its device and
precision (from the backend table; a first use on this machine tried in a child process, runtime/trial.py)
(`prepare_run`: what a Ray driver resolves once for all its actors), then the backend itself, whose graphs each pass
their canary before anything is bound (runtime/verify.py). With `--backend auto` a backend at a precision known to
be broken here, or that crashed or missed its canaries, is passed over for the next row of the table, saying so.
`--backend reference` is the PyTorch reference instead, on the model itself.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from r2r import __version__, graph_io
from r2r.backends import BackendRow, BuildRequest, backend_row, known_issue
from r2r.config import Inversion, Method, Variant
from r2r.errors import FlagError
from r2r.log import log
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, default_resolution, model_defaults, sha256_file
from r2r.prompts import text_weights
from r2r.runtime.bundle_reader import Bundle, open_bundle
from r2r.runtime.device import Backend
from r2r.runtime.prompt_encoder import PromptEncoder, TextRows
from r2r.runtime.scheduler import CoupledScheduler, StepCallback, bundle_graphs, program_graphs
from r2r.runtime.select import (
    DeviceUnavailable,
    backend_candidates,
    cached_bundle,
    resolve_device,
    resolve_precision,
    runtime_module,
)
from r2r.runtime.trial import TrialSpec, check_first_use
from r2r.runtime.verify import EngineRejected, Verified, verify_graphs
from r2r.sizing import MAX_SIDE, Fit, Placement, SizeRange, place

REFERENCE = "reference"  # --backend reference: the PyTorch reference (the oracle) on the model, no bundle
FusedChoice = Literal["auto", "on", "off"]
Prompts = Sequence[str | None] | None  # one per image of a batch (None or "": no prompt)


@dataclass(frozen=True)
class RunConfig:
    """What to run; every field the CLIs do not set keeps its default."""

    engine: Path | None = None  # a bundle; None: the model's, exported once into the cache
    model: Path | None = None  # None: the embedded default
    embedding: Path | None = None  # None: MODEL/negative_embedding.safetensors
    width: int | None = None  # None: the model's own resolution (a bundle has its own)
    height: int | None = None
    backend: str = "auto"  # a backend table name, "auto", or "reference" (the PyTorch reference)
    device: str = "auto"  # bundle backends: auto / cpu / cuda; the reference: a torch device
    precision: str | None = None  # None: the backend's default
    batch: int = 1
    method: Method = field(default_factory=Method)  # tac_divisor None: the bundle's
    inversion: Inversion = "exact"
    fused: FusedChoice = "auto"
    threads: int = 0  # per backend session; 0: all cores
    batch_max: int = 4  # of a bundle exported into the cache (at least `batch`)
    fit: Fit = "pad"  # how an input the bundle does not take as it is runs (r2r/sizing.py)
    max_pixels: int | None = None  # the pixel budget; None: the model's native area
    max_sizes: int = 4  # sizes whose buffers stay allocated at once, where dropping them frees them

    def model_dir(self) -> Path:
        return self.model or EMBEDDED_DEFAULT

    def embedding_file(self) -> Path:
        return self.embedding or self.model_dir() / EMBEDDING_FILE

    def size(self) -> tuple[int, int]:
        dw, dh = default_resolution(self.model_dir())
        w, h = self.width or dw, self.height or dh
        if w % 8 or h % 8:
            raise FlagError(f"--width/--height must be multiples of 8, got {w}x{h}")
        return w, h


@dataclass
class Runtime:
    """A translator: uint8 [H, W, 3] images of one size it takes (at most `batch`) -> uint8 outputs, with what made
    them. `place` says at what size an input of any size runs (r2r/sizing.py)."""

    translate: Callable[[list[np.ndarray], StepCallback | None, Method, Prompts], list[np.ndarray]]
    params: dict[str, Any]  # recorded in every output (and compared by --resume)
    method: Method  # the one it opened with, complete (its TAC divisor the bundle's)
    resolve: Callable[[Method], Method]  # a method given per call, completed and checked against the bundle
    evaluations: Callable[[], float]  # UNet evaluations per image so far
    sizes: SizeRange
    fit: Fit = "pad"
    max_pixels: int | None = None
    device: str = "cpu"
    bundle: Bundle | None = None
    backend: Backend | None = None
    scheduler: CoupledScheduler | None = None  # the example size's (the others are made on first use)
    verified: Verified | None = None  # what the canaries found when the backend opened its graphs
    # refuses prompts the run cannot use before any work (a bundle without a text encoder, the embedding's token)
    check_prompts: Callable[[Sequence[str | None]], None] = lambda prompts: None

    def __call__(self, images: list[np.ndarray], on_step: StepCallback | None = None,
                 method: Method | None = None, prompts: Prompts = None) -> list[np.ndarray]:
        """Images of one run size (at most the batch) -> outputs; `on_step(done, total)` per denoising step where the
        backend can say; `method` (from `resolve`): another method than the one opened with, for this call;
        `prompts`: one per image (None or "": none), used where the method's text guidance is > 0."""
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        return self.translate(images, on_step, self.method if method is None else method, prompts)

    def params_for(self, method: Method | None = None, fit: Fit | None = None,
                   max_pixels: int | None = None) -> dict[str, Any]:
        """What an output made with `method` (resolved), `fit` and `max_pixels` records (None: the opened ones)."""
        given = {**({} if method is None else method.as_dict()), **({} if fit is None else {"fit": fit}),
                 **({} if max_pixels is None else {"max_pixels": max_pixels})}
        return {**self.params, **given}

    def place(self, width: int, height: int, fit: Fit | None = None, max_pixels: int | None = None) -> Placement:
        """At what size an input runs (None: the opened fit and pixel limit)."""
        return place(width, height, self.sizes, fit or self.fit, self.max_pixels if max_pixels is None else max_pixels)

    def describe(self) -> str:
        return describe_run(self.params, self.device)

    def close(self) -> None:
        _close(self.backend)


def describe_run(params: dict[str, Any], device: str) -> str:
    """What a run is, for its summary line: backend, precision, device, inversion, fused."""
    if params["backend"] == REFERENCE:
        return f"{REFERENCE} reference, {params['inversion']} inversion"
    return (f"{params['backend']} {params['precision']} on {device}, {params['inversion']} inversion"
            f"{', fused' if params['fused'] else ''}")


def _close(backend: Backend | None) -> None:
    close = getattr(backend, "close", None)  # device backends hold a stream and device memory
    if close is not None:
        close()


@dataclass
class PreparedRun:
    """A run resolved down to what each process that runs it opens: the bundle (exported and built once), the
    backend row, device and precision (tried on this machine), the method and the program's variant with the graphs
    it calls, what every output records, and the sizes it takes. `r2r-run --ray` prepares on the driver; each actor
    then opens the same run."""

    root: Path
    bundle: Bundle
    row: BackendRow
    device: str
    precision: str
    method: Method
    variant: Variant
    params: dict[str, Any]
    sizes: SizeRange
    graphs: tuple[str, ...] = ()  # the bundle graphs the program calls (each checked by its canary when opened)

    def describe(self) -> str:
        return describe_run(self.params, self.device)

    def config(self, cfg: RunConfig) -> RunConfig:
        """`cfg` pinned to this run: its bundle, backend, device and precision (nothing left to resolve)."""
        return replace(cfg, engine=self.root, backend=self.row.name, device=self.device, precision=self.precision)


def prepare_run(cfg: RunConfig, progress: Callable[[str], None] = log,
                refused: Collection[tuple[str, str]] = ()) -> PreparedRun:
    """Steps 1-4 of `open_runtime`: everything but opening the backend (bundle backends only). `refused`: (backend,
    precision) pairs `--backend auto` must pass over (their canaries failed in this process)."""
    if cfg.batch < 1:
        raise FlagError("--batch-size must be >= 1")
    # 1. what can be checked before a bundle is exported
    named = None if cfg.backend == "auto" else backend_row(cfg.backend)
    if named is not None:
        resolve_device(named, cfg.device)
        if cfg.precision is not None:
            named.check_precision(cfg.precision)
    # 2. the program's variant: auto fuses the TAC step whenever the inversion allows it (one routed UNet call of
    # 3B instead of emit B + inject 2B, and the only UNet graph the program loads)
    fused = cfg.fused == "on" or (cfg.fused == "auto" and cfg.inversion == "exact")
    variant = Variant(cfg.inversion, fused)
    if cfg.method.interval > 1 and not fused:
        raise FlagError(f"--cache-interval {cfg.method.cache_interval}: step caching runs in the fused program "
                        "(exact inversion, --fused auto or on)")
    # 3. the bundle (a model's: its cached export of the graphs the program calls, step caching's where the model's
    # defaults step-cache) and the method, completed by the bundle
    if cfg.engine is not None:
        root = cfg.engine
    else:
        w, h = cfg.size()
        interval = cfg.method.cache_interval or (model_defaults(cfg.model_dir()).cache_interval if fused else 1)
        graphs = bundle_graphs(variant, step_cache=interval > 1) \
            if named is None or named.graphs else ()
        root = cached_bundle(cfg.model_dir(), cfg.embedding_file(), w, h, max(cfg.batch_max, cfg.batch),
                             cfg.method.divisor, progress, graphs, cfg.method.pool)
    bundle = open_bundle(root)
    method = bundle.method(cfg.method, fused)
    cache = method.interval > 1
    # 4. backend, device, precision: the named one, or auto's rows fastest first, passing over those known broken
    # on this CPU or that failed their first use here (auto picks the torch backend only where the model is known to
    # be the bundle's: it runs the model's modules)
    candidates = backend_candidates(cfg.backend, bundle, cfg.device, eligible=lambda r: r.graphs or cfg.engine is None
                                    or cfg.model is not None)
    passed: list[str] = []
    for row, device in candidates:
        if named is None and cfg.precision is not None and cfg.precision not in row.precisions:
            continue
        precision = resolve_precision(row, bundle, cfg.precision, device)
        if (row.name, precision) in refused:
            continue
        issue = known_issue(row.name, precision, not bundle.manifest.sizes.get("static", False)) \
            if device == "cpu" else None
        if issue is not None:
            if named is not None:
                raise EngineRejected(row.name, precision, "program", f"is a known engine bug here: {issue.what} "
                                     f"({issue.reference})", fallback=issue.fix)
            passed.append(f"{row.name} {precision} ({issue.what}, {issue.reference})")
            continue
        slot = row.slot(device, precision, "")
        if cfg.engine is None and row.builder and not any(k.startswith(slot) for k in bundle.manifest.engines):
            progress(f"r2r-run: building the {row.name} {precision} engines of {root} once")
            request = BuildRequest(precision, device, model=cfg.model_dir(), embedding=cfg.embedding_file())
            importlib.import_module(row.builder).build(root, request, progress)
            bundle = open_bundle(root)
        # the text rows' update where the bundle has it (a prompt's batches; checked with the others)
        text = graph_io.GUIDED_TEXT_STEP in bundle.manifest.graphs and device in row.step_devices
        graphs = program_graphs(variant, device in row.step_devices, cache)
        graphs += (graph_io.GUIDED_TEXT_STEP,) if text else ()
        model = None if row.graphs else str(cfg.model_dir())
        try:
            check_first_use(bundle, TrialSpec(str(root), row.name, device, precision, cfg.threads, graphs, model),
                            progress)
        except EngineRejected as exc:
            if named is not None:
                raise
            passed.append(exc.short)
            continue
        break
    else:
        raise DeviceUnavailable(f"no backend can run {root} on device {cfg.device} here"
                                + (f" (passed over: {'; '.join(passed)})" if passed else ""))
    if passed:
        progress(f"r2r: passed over {'; '.join(passed)}: using {row.name} {precision}")
    (w0, h0), (w1, h1) = bundle.size_range()
    sizes = SizeRange(bundle.multiple, (w0, h0), (w1, h1), (bundle.width, bundle.height))
    params = {**method.as_dict(), "fit": cfg.fit, "max_pixels": cfg.max_pixels, "backend": row.name,
              "precision": precision, "inversion": cfg.inversion, "fused": fused, "bundle_sha256": bundle.sha256,
              "r2r": __version__}
    return PreparedRun(Path(root), bundle, row, device, precision, method, variant, params, sizes, graphs)


def open_runtime(cfg: RunConfig, progress: Callable[[str], None] = log) -> Runtime:
    if cfg.backend == REFERENCE:
        if cfg.batch < 1:
            raise FlagError("--batch-size must be >= 1")
        return _open_reference(cfg)
    refused: list[tuple[str, str]] = []
    while True:
        run = prepare_run(cfg, progress, refused)
        bundle, method, variant = run.bundle, run.method, run.variant
        # 5. the backend; every graph of the program checked by its canary (docs/design.md, "Verified engines");
        # the example size's scheduler (buffers allocated once, the program bound)
        backend = runtime_module(run.row).open_backend(bundle, run.device, run.precision, cfg.threads,
                                                       model=cfg.model_dir())
        try:
            verified = verify_graphs(backend, bundle, run.graphs, progress)
            progress(f"r2r: {run.row.name} {run.precision} canaries: {verified.describe()}")
            scheduler = CoupledScheduler(bundle, backend, cfg.batch, method, variant)
        except EngineRejected as exc:
            _close(backend)
            if cfg.backend != "auto":
                raise
            progress(f"r2r: {exc.short}: trying the next backend")
            refused.append((run.row.name, run.precision))
            continue
        except BaseException:
            _close(backend)
            raise
        break
    # 6. a scheduler (buffers and bound program) per image size, made on the size's first batch (and per method,
    # where a call gives another: a server's requests may; and per batch a partial batch rounds up to)
    schedulers = SchedulerCache(lambda key: CoupledScheduler(bundle, backend, key[2], key[1], variant, key[0], key[3]),
                                cfg.max_sizes if backend.frees_dropped_buffers else None, cfg.batch, bundle,
                                cfg.threads)
    schedulers.put(((bundle.width, bundle.height), method, cfg.batch, False), scheduler)

    def resolve(given: Method) -> Method:
        m = bundle.method(given, variant.fused)
        bundle.check(m, cfg.batch)
        return m

    return Runtime(schedulers.translate, run.params, method, resolve, lambda: scheduler.unet_evaluations_per_image,
                   run.sizes, cfg.fit, cfg.max_pixels, run.device, bundle, backend, scheduler, verified,
                   schedulers.check_prompts)


def run_batch(k: int, batch: int) -> int:
    """The batch a scheduler runs `k` images of one size in: the next power of two, at most `batch`. A partial batch
    (a server's lone request, the last images of a run) costs its own work, not a full batch padded, and a size has
    at most log2(batch) + 1 schedulers."""
    if not 1 <= k <= batch:
        raise ValueError(f"{k} images for a batch of {batch}")
    return min(batch, 1 << (k - 1).bit_length())


class SchedulerCache:
    """One coupled scheduler per (image size, method, run batch, text rows), made on first use. With `keep`, the
    least recently used beyond `keep` are dropped (host backends: their buffers go with them); without, every one
    stays (device backends, whose memory is the backend's until it closes). Prompts are encoded by the bundle's
    text encoder, opened on the first batch that has one."""

    def __init__(self, make: Callable[[Any], Any], keep: int | None, batch: int = 1, bundle: Bundle | None = None,
                 threads: int = 0) -> None:
        self.make, self.keep, self.batch = make, keep, batch
        self.bundle, self.threads = bundle, threads
        self._by_key: OrderedDict[Any, Any] = OrderedDict()
        self._encoder: PromptEncoder | None = None

    def encoder(self) -> PromptEncoder:
        if self.bundle is None:
            raise ValueError("prompts need the bundle the schedulers run")
        if self._encoder is None:
            self._encoder = PromptEncoder(self.bundle, self.threads or 1)
        return self._encoder

    def check_prompts(self, prompts: Sequence[str | None]) -> None:
        if any(prompts):
            self.encoder().check(prompts)

    def text_rows(self, prompts: Prompts, method: Method) -> TextRows | None:
        """The batch's text rows (None: the program without them)."""
        if prompts is None or text_weights(prompts, method.text_guidance) is None:
            return None  # no encoder opened for a batch without text rows
        return self.encoder().rows(prompts, method)

    def put(self, key: Any, scheduler: Any) -> None:
        self._by_key[key] = scheduler

    def get(self, key: Any) -> Any:
        if key not in self._by_key:
            self._by_key[key] = self.make(key)
        self._by_key.move_to_end(key)
        while self.keep is not None and len(self._by_key) > max(self.keep, 1):
            self._by_key.popitem(last=False)
        return self._by_key[key]

    def translate(self, images: list[np.ndarray], on_step: StepCallback | None, method: Method,
                  prompts: Prompts = None) -> list[np.ndarray]:
        """Images of one size through that size's (and method's, and batch's, and text rows') scheduler."""
        h, w = images[0].shape[:2]
        if any(im.shape[:2] != (h, w) for im in images):
            raise ValueError("a batch holds images of one size; group them by size first")
        rows = self.text_rows(prompts, method)
        scheduler = self.get(((w, h), method, run_batch(len(images), self.batch), rows is not None))
        return scheduler(images, on_step, None if rows is None else (rows.cond, rows.weights))

    def __len__(self) -> int:
        return len(self._by_key)


def _open_reference(cfg: RunConfig) -> Runtime:
    import torch

    from r2r.models import load_components
    from r2r.reference import ReferencePipeline
    from r2r.tac import pixel_multiple

    interval = model_defaults(cfg.model_dir()).cache_interval if cfg.inversion == "exact" else 1

    def resolve(given: Method) -> Method:  # no bundle: the method's own divisor and pool, the model's interval
        return given.complete(given.divisor, given.pool, interval)

    method = resolve(cfg.method)
    w, h = cfg.size()
    emb = cfg.embedding_file()
    device = "cpu" if cfg.device == "auto" else cfg.device
    comps = load_components(cfg.model_dir(), device=device, dtype=torch.float32)
    pipe = ReferencePipeline(comps, emb, w, h)
    m = pixel_multiple(comps.unet.config)
    sizes = SizeRange(m, (2 * m, 2 * m), (MAX_SIDE, MAX_SIDE), (w, h))
    params = {**method.as_dict(), "fit": cfg.fit, "max_pixels": cfg.max_pixels, "backend": REFERENCE,
              "inversion": cfg.inversion, "model": cfg.model_dir().name, "embedding_sha256": sha256_file(emb),
              "r2r": __version__}

    def translate(images: list[np.ndarray], on_step: StepCallback | None, given: Method,
                  prompts: Prompts = None) -> list[np.ndarray]:
        pipe.set_size(images[0].shape[1], images[0].shape[0])
        return pipe(images, given, cfg.inversion, prompts)

    return Runtime(translate, params, method, resolve, lambda: round(pipe.count.per_image), sizes, cfg.fit,
                   cfg.max_pixels, device, check_prompts=pipe.prompts.check)


__all__ = ["REFERENCE", "PreparedRun", "RunConfig", "Runtime", "SchedulerCache", "describe_run", "open_runtime",
           "prepare_run", "run_batch"]
