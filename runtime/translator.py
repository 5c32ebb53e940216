"""`r2r.Translator`: the translation as an object, the public API every command is a shell over.

Opened like `r2r-run` (the same parameters, refused with the same words), it holds one runtime (the bundle, its
backend with every graph verified, a scheduler per image size) until `close()`:

    with Translator(backend="onnxruntime", method=Method(steps=20)) as t:
        result = t.translate(["render.png", pil_image, uint8_array])   # mixed sizes
        result.images[0].save("photo.png"); result.params                # what made them
        summary = t.translate_files(["renders/"], "out/", resume=True)    # what r2r-run does

Calls are serialised inside (one lock): a server may call one Translator from several threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from PIL import Image

from r2r import storage
from r2r.backends import DEVICES
from r2r.config import INVERSIONS, Inversion, Method
from r2r.errors import FlagError
from r2r.imageio import ImageReadError, collect_inputs, load_rgb, output_path_for
from r2r.log import log
from r2r.lora import LoraSpec
from r2r.prompts import PromptTable
from r2r.runtime.assembly import REFERENCE, FusedChoice, RunConfig, Runtime, open_runtime
from r2r.runtime.outputs import is_complete, write_output
from r2r.runtime.scheduler import DegenerateOutput
from r2r.sizing import FITS, Fit, Placement, group_by_size, prepare, restore
from r2r.source import ModelSource
from r2r.storage import Location

ImageLike = Image.Image | np.ndarray | str | os.PathLike[str]
# Prompts (docs/design.md, "Prompts"; used where the method's text_guidance > 0): one for every image, one per image
# (None or "": none), or for files a `--prompts` table (metadata.jsonl) that gives each input its own.
PromptsLike = str | Sequence[str | None] | PromptTable | None


@dataclass(frozen=True)
class Progress:
    """One event of a translation: an image done (`kind` "image", `done` of `total` in the call, `input` its name),
    or a denoising step of the batch in flight (`kind` "step", `done` of `total` steps; backends that replay the
    whole program as one CUDA graph report no steps)."""

    kind: Literal["image", "step"]
    done: int
    total: int
    input: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass
class Translation:
    """`translate`'s result: one PIL image per input, at its size, and what made them (the record every PNG of
    `r2r-run` carries)."""

    images: list[Image.Image]
    params: dict[str, Any]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]


@dataclass(frozen=True)
class FileResult:
    input: str
    output: str  # "" where nothing was written
    status: Literal["ok", "skipped", "failed"]
    error: str = ""


@dataclass
class RunSummary:
    """What `translate_files` did: one result per input, the time it took and what ran."""

    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    description: str = ""  # backend, precision, device, variant
    evaluations: float = 0.0  # UNet evaluations per image

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def line(self, output: Location) -> str:
        """The summary line `r2r-run` prints."""
        done = self.count("ok")
        rate = done / self.seconds if self.seconds > 0 else 0.0
        return (f"r2r-run: {done} written, {self.count('skipped')} skipped (complete), {len(self.failed)} failed in "
                f"{self.seconds:.1f} s ({rate:.2f} img/s; {self.description}, {self.evaluations:g} UNet evaluations "
                f"per image) -> {output}")


class Translator:
    """FashionR2R's translation from renders to photos, opened once (see the module docstring).

    `model`, `lora`, `embedding`, `token`: the model source (a diffusers directory or a .safetensors checkpoint;
    LoRAs as LoraSpec or "FILE[:SCALE]"); `engine`: a bundle instead (it has its own model, size and embedding).
    `method`: the method's parameters (`Method()`: the bundle's defaults). Errors are r2r's own (`r2r.errors.R2RError`
    and its kinds: a bad input file, a model or bundle that cannot be used, a flag that does not apply), with the
    words `r2r-run` prints.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, engine: str | os.PathLike[str] | None = None,
                 backend: str = "auto", precision: str | None = None, device: str = "auto", batch_size: int = 1,
                 threads: int = 0, lora: Sequence[LoraSpec | str] = (), embedding: str | os.PathLike[str] | None = None,
                 token: str | None = None, fit: Fit = "pad", max_pixels: int | None = None,
                 method: Method | None = None, inversion: Inversion = "exact", fused: FusedChoice = "auto",
                 width: int | None = None, height: int | None = None, log: Callable[[str], None] = log) -> None:
        self._open(run_config(ModelSource.of(model, lora, embedding, token), None if engine is None else Path(engine),
                              backend, precision, device, batch_size, threads, fit, max_pixels, method or Method(),
                              inversion, fused, width, height, log), log)

    @classmethod
    def from_config(cls, cfg: RunConfig, log: Callable[[str], None] = log) -> Translator:
        """A Translator of a run already resolved (a Ray actor's pinned run, a benchmark's configuration)."""
        self = cls.__new__(cls)
        self._open(cfg, log)
        return self

    def _open(self, cfg: RunConfig, progress: Callable[[str], None]) -> None:
        self.config = cfg
        self.runtime: Runtime = open_runtime(cfg, progress)
        self._lock = threading.Lock()

    # -- what it is ---------------------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """What every output records (and `--resume` compares)."""
        return self.runtime.params

    def describe(self) -> str:
        return self.runtime.describe()

    def close(self) -> None:
        """Free the backend's sessions and buffers; the Translator cannot translate after."""
        with self._lock:
            self.runtime.close()

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- translating --------------------------------------------------------------------------------------------------
    def translate(self, images: Sequence[ImageLike], progress: ProgressCallback | None = None,
                  method: Method | None = None, fit: Fit | None = None, max_pixels: int | None = None,
                  prompts: PromptsLike = None) -> Translation:
        """Translate images of any sizes (PIL images, uint8 [H, W, 3] arrays, paths or URLs), batched by run size as
        `r2r-run` does; one PIL image per input, at its size. `method`, `fit`, `max_pixels`: other values than the
        ones opened with, for this call (a method's TAC divisor and target must be the bundle's: BundleError).
        `prompts`: one for all images or one per image, used at the method's `text_guidance` (> 0). A file that
        cannot be read raises ImageReadError naming it before any work; an image the engine computed as non-finite
        raises DegenerateOutput naming it."""
        arrays = [as_rgb(x, i) for i, x in enumerate(images)]
        names = [name_of(x, i) for i, x in enumerate(images)]
        per_image = prompts_for(prompts, [x if isinstance(x, str | os.PathLike) else None for x in images])
        self.runtime.check_prompts(per_image)
        out: list[Image.Image | None] = [None] * len(arrays)
        check_fit(fit, max_pixels)
        with self._lock:
            resolved = None if method is None else self.runtime.resolve(method)
            items = [(i, prepare(a, p), p) for i, a in enumerate(arrays)
                     for p in [self.runtime.place(a.shape[1], a.shape[0], fit, max_pixels)]]
            for batch in group_by_size(items, lambda it: it[2].run, self.config.batch):
                outs = self._run(batch, names, progress, resolved, [per_image[i] for i, _, _ in batch])
                for (i, _, placement), img in zip(batch, outs, strict=True):
                    if img is None:
                        continue
                    out[i] = Image.fromarray(restore(img, placement))
                    _say(progress, Progress("image", sum(o is not None for o in out), len(arrays), names[i]))
        return Translation(cast(list[Image.Image], out), self.runtime.params_for(resolved, fit, max_pixels))

    def _run(self, batch: list[tuple[int, np.ndarray, Placement]], names: list[str],
             progress: ProgressCallback | None, method: Method | None,
             prompts: list[str | None]) -> list[np.ndarray | None]:
        """One batch of one run size; a refused image raises, naming its input."""
        on_step = None if progress is None else (lambda d, n: progress(Progress("step", d, n)))
        try:
            return list(self.runtime([img for _, img, _ in batch], on_step, method, prompts))
        except DegenerateOutput as exc:
            raise DegenerateOutput({batch[i][0]: f"{names[batch[i][0]]}: {why}" for i, why in exc.problems.items()},
                                   exc.outputs) from None

    def run_size(self, width: int, height: int, fit: Fit | None = None, max_pixels: int | None = None
                 ) -> tuple[int, int]:
        """The size an input of width x height runs at (the images of one run size can share a batch)."""
        return self.runtime.place(width, height, fit, max_pixels).run

    def translate_batch(self, images: list[np.ndarray], on_step: Callable[[int, int], None] | None = None,
                        prompts: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """The low-level call: images already at one run size (`runtime.place`, `r2r.sizing.prepare`), at most the
        batch size, uint8 [H, W, 3] -> outputs at the run size; `prompts`: one per image. Not serialised: callers
        hold their own order."""
        return self.runtime(images, on_step, None, prompts)

    def translate_files(self, inputs: Sequence[str | os.PathLike[str]] | str, output: str | os.PathLike[str],
                        resume: bool = False, progress: ProgressCallback | None = None,
                        prompts: str | PromptTable | None = None) -> RunSummary:
        """What `r2r-run` does: every image of `inputs` (files, folders, globs, .txt lists; or fsspec URLs) to one PNG
        each in `output` (a folder or a URL), written atomically with the parameters inside (an input's prompt with
        them); `resume` skips outputs that are complete with these parameters. `prompts`: one for every input, or a
        table (`PromptTable.read("metadata.jsonl")`) of each input's own. A file that cannot be read, or an image the
        engine computed as non-finite, is a failed result with its reason; the others are written."""
        specs = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
        paths = collect_inputs([str(s) for s in specs])
        if not paths:
            raise ImageReadError(f"no image found in {', '.join(str(s) for s in specs)}")
        out = storage.location(str(output))
        if storage.is_url(out):
            storage.filesystem(str(out))  # a missing filesystem package fails here, before any work
        params = self.params
        self.runtime.check_prompts([prompts] if isinstance(prompts, str) else
                                   list(prompts.by_name.values()) if isinstance(prompts, PromptTable) else [])
        summary = RunSummary(description=self.describe())
        with self._lock:
            storage.make_dirs(out)
            todo = []
            for p in paths:
                if resume and is_complete(output_path_for(p, out), params_with_prompt(params, prompt_of(prompts, p))):
                    summary.results.append(FileResult(str(p), str(output_path_for(p, out)), "skipped"))
                else:
                    todo.append(p)
            start = time.perf_counter()
            for result in self._stream(todo, out, params, progress, prompts):
                summary.results.append(result)
            summary.seconds = time.perf_counter() - start
            summary.evaluations = self.runtime.evaluations()
        return summary

    def _stream(self, paths: list[Location], out: Location, params: dict[str, Any],
                progress: ProgressCallback | None, prompts: str | PromptTable | None) -> Iterator[FileResult]:
        done = 0

        def told(results: list[FileResult]) -> list[FileResult]:
            nonlocal done
            for r in results:
                done += 1
                _say(progress, Progress("image", done, len(paths), r.input))
            return results

        on_step = None if progress is None else (lambda d, n: progress(Progress("step", d, n)))
        for item in stream_batches(paths, self.runtime, self.config.batch):
            if isinstance(item, FileResult):
                yield from told([item])
                continue
            batch_prompts = [prompt_of(prompts, p) for p, _, _ in item]
            yield from told(deliver_batch(lambda ims, ps=batch_prompts: self.translate_batch(ims, on_step, ps), item,
                                          out, params, batch_prompts))


def _say(progress: ProgressCallback | None, event: Progress) -> None:
    if progress is not None:
        progress(event)


Batch = list[tuple[Location, np.ndarray, Placement]]


def stream_batches(paths: Iterable[Location], runtime: Runtime, batch_size: int, pending_max: int = 0
                   ) -> Iterator[Batch | FileResult]:
    """Read `paths` in order, place each at its run size, and yield batches of one run size (`group_by_size`: full
    batches as soon as they are, a folder of mixed sizes in bounded memory), and a failed result for each input that
    cannot be read, as it is met."""
    failed: list[FileResult] = []

    def decoded() -> Iterator[tuple[Location, np.ndarray, Placement]]:
        for p in paths:
            try:
                img = load_rgb(p)
            except ImageReadError as exc:
                failed.append(FileResult(str(p), "", "failed", str(exc)))
                continue
            placement = runtime.place(img.shape[1], img.shape[0])
            yield p, prepare(img, placement), placement

    for batch in group_by_size(decoded(), lambda item: item[2].run, batch_size, pending_max):
        yield from failed
        failed.clear()
        yield batch
    yield from failed


def prompt_of(prompts: str | PromptTable | None, path: Location | os.PathLike[str] | None) -> str | None:
    """An input's prompt: the one for all, its record in a table (none for an image not given by path), or none."""
    if isinstance(prompts, PromptTable):
        return None if path is None else prompts.for_input(path)
    return prompts or None


def prompts_for(prompts: PromptsLike, paths: Sequence[str | os.PathLike[str] | None]) -> list[str | None]:
    """One prompt (or None) per image: `prompts` for all, per image, or from a table by each path-given image's
    name."""
    if prompts is None or isinstance(prompts, str | PromptTable):
        return [prompt_of(prompts, p) for p in paths]
    given = list(prompts)
    if len(given) != len(paths):
        raise FlagError(f"{len(given)} prompts for {len(paths)} images: give one per image, or one string for all")
    if any(p is not None and not isinstance(p, str) for p in given):
        raise FlagError("prompts are strings (None or \"\": no prompt)")
    return [p or None for p in given]


def params_with_prompt(params: dict[str, Any], prompt: str | None) -> dict[str, Any]:
    """What an output records: the run's parameters, and its input's prompt where it had one."""
    return params if not prompt else {**params, "prompt": prompt}


def deliver_batch(translate: Callable[[list[np.ndarray]], list[np.ndarray]], batch: Batch, output: Location,
                  params: dict[str, Any], prompts: Sequence[str | None] | None = None) -> list[FileResult]:
    """Translate one batch and write each image the runtime delivers (an image it refuses as non-finite or
    degenerate is a failed result with the reason, never a PNG), with its prompt (`prompts`, one per input) in its
    parameters; one result per input, in the batch's order."""
    results: dict[int, FileResult] = {}
    try:
        try:
            outs: list[np.ndarray | None] = list(translate([img for _, img, _ in batch]))
        except DegenerateOutput as exc:  # the batch's other images are delivered
            outs = exc.outputs
            results |= {i: FileResult(str(batch[i][0]), "", "failed", f"not delivered: {why}")
                        for i, why in exc.problems.items()}
        for i, ((p, _, placement), img) in enumerate(zip(batch, outs, strict=True)):
            if img is not None:
                dst = output_path_for(p, output)
                write_output(dst, restore(img, placement),
                             params_with_prompt(params, prompts[i] if prompts else None), storage.name_of(p))
                results[i] = FileResult(str(p), str(dst), "ok")
    except (RuntimeError, ValueError, OSError) as exc:
        results |= {i: FileResult(str(p), "", "failed", str(exc)) for i, (p, _, _) in enumerate(batch)
                    if i not in results}
    return [results[i] for i in range(len(batch))]


def as_rgb(image: ImageLike, index: int = 0) -> np.ndarray:
    """An input as uint8 RGB [H, W, 3]: a PIL image converted, an array checked, a path or URL read."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageReadError(f"image {index + 1}: an array input is uint8 [H, W, 3]; got {image.dtype} "
                                 f"{list(image.shape)}")
        return image
    if isinstance(image, str | os.PathLike):
        return load_rgb(storage.location(str(image)))
    raise ImageReadError(f"image {index + 1}: a PIL image, a uint8 [H, W, 3] array, a path or a URL; got "
                         f"{type(image).__name__}")


def name_of(image: ImageLike, index: int) -> str:
    return str(image) if isinstance(image, str | os.PathLike) else f"image {index + 1}"


# Flags that only one kind of run takes, by their command-line names (the API refuses them with the same words).
SOURCE_FLAGS = ("--model", "--lora", "--embedding", "--token")


def run_config(source: ModelSource, engine: Path | None, backend: str, precision: str | None, device: str,
               batch_size: int, threads: int, fit: Fit, max_pixels: int | None, method: Method, inversion: Inversion,
               fused: FusedChoice, width: int | None, height: int | None,
               progress: Callable[[str], None] = log) -> RunConfig:
    """The run a Translator opens, its parameters checked first and its model source resolved (once)."""
    check_parameters(source, engine, backend, precision, device, batch_size, fit, inversion, fused, width, height,
                     max_pixels)
    resolved = None if engine is not None else source.resolve(progress)
    return RunConfig(engine=engine, model=None if resolved is None else resolved.model,
                     embedding=None if resolved is None else resolved.embedding, width=width, height=height,
                     backend=backend, device=device, precision=precision, batch=batch_size, method=method,
                     inversion=inversion, fused=fused, threads=threads, fit=fit, max_pixels=max_pixels)


def check_fit(fit: str | None, max_pixels: int | None) -> None:
    if fit is not None and fit not in FITS:
        raise FlagError(f"--fit {fit}: choose {', '.join(FITS)}")
    if max_pixels is not None and max_pixels < 4096:
        raise FlagError(f"--max-pixels {max_pixels}: at least 4096")


def check_parameters(source: ModelSource, engine: Path | None, backend: str, precision: str | None, device: str,
                     batch_size: int, fit: str, inversion: str, fused: str, width: int | None, height: int | None,
                     max_pixels: int | None) -> None:
    """Refuse, by flag name and with the fix, every parameter that does not apply to this kind of run, before
    anything is converted, exported or loaded."""
    from r2r.backends import NAMES

    if backend not in ("auto", *NAMES, REFERENCE):
        raise FlagError(f"--backend {backend}: choose auto, {', '.join(NAMES)} or {REFERENCE}")
    if batch_size < 1:
        raise FlagError("--batch-size must be >= 1")
    check_fit(fit, max_pixels)
    if inversion not in INVERSIONS:
        raise FlagError(f"--inversion {inversion}: choose {', '.join(INVERSIONS)}")
    if fused not in ("auto", "on", "off"):
        raise FlagError(f"--fused {fused}: choose auto, on or off")
    if backend == REFERENCE:
        bad = [flag for flag, given in (("--engine", engine is not None), ("--fused", fused != "auto")) if given]
        if bad:
            raise FlagError(f"{', '.join(bad)}: the PyTorch reference runs the model itself, not a bundle; drop it, "
                            "or choose a bundle backend with --backend")
        if precision not in (None, "fp32"):
            raise FlagError(f"--precision {precision}: the PyTorch reference runs fp32 only")
        return
    if engine is not None:
        bad = source.given + [flag for flag, v in (("--width", width), ("--height", height)) if v is not None]
        if bad:
            raise FlagError(f"{', '.join(bad)}: the bundle {engine} was exported from its own model, size and "
                            "embedding; drop --engine to translate with this model's bundle (exported once into the "
                            "cache), or export one with `r2r-export onnx`")
    if device not in ("auto", *DEVICES):
        raise FlagError(f"--device {device}: bundle backends take auto, {', '.join(DEVICES)}")


__all__ = ["FileResult", "ImageLike", "Progress", "ProgressCallback", "RunSummary", "Translation", "Translator",
           "as_rgb", "check_fit", "check_parameters", "deliver_batch", "run_config", "stream_batches"]
