"""`r2r-run --ray ADDRESS`: the translation of `r2r-run` on a Ray cluster, through Ray Data.

The driver prepares the run once and plans the batches as one process does, so the outputs are single-process
`r2r-run`'s; actors write each PNG atomically, a dead actor's batch is retried, and the driver appends one record
per input to OUT/results.jsonl (for a URL output, a local log uploaded whole every `UPLOAD_EVERY_S`).
Why: docs/scale-out.md, "`r2r-run --ray`" (from docs/design.md, "The bundle").
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r2r import storage
from r2r.imageio import ImageReadError, load_rgb, oriented_size, output_path_for
from r2r.log import log
from r2r.runtime.assembly import PreparedRun, RunConfig
from r2r.runtime.outputs import is_complete, params_hash, write_output
from r2r.runtime.scheduler import DegenerateOutput
from r2r.sizing import Placement, group_by_size, place, prepare, restore
from r2r.storage import Location

RESULTS_FILE = "results.jsonl"
UPLOAD_EVERY_S = 30.0  # a URL output's results.jsonl is uploaded whole this often
INSTALL_HINT = "r2r-run --ray needs Ray Data: pip install 'r2r[ray]'"


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide: `address` is `local` (a cluster on this machine for the run), `auto` (join RAY_ADDRESS
    or the local node's cluster) or `ray://host:port`; actors from `min_actors` to `max_actors` (autoscaling between
    them), each with `threads` CPUs, or one GPU where `gpus` is set."""

    address: str = "local"
    min_actors: int | None = None  # None: as many as the cluster has room for (its CPUs / threads, or its GPUs)
    max_actors: int | None = None
    threads: int = 1
    gpus: float = 0.0

    def pool(self, cluster: dict[str, float]) -> tuple[int, int]:
        """(min, max) actors on a cluster with these resources (`ray.cluster_resources()`)."""
        room = int(cluster.get("GPU", 0) // self.gpus) if self.gpus else int(cluster.get("CPU", 1) // self.threads)
        lo = self.min_actors or max(1, room)
        return lo, max(lo, self.max_actors or lo)


def parse_actors(text: str, flag: str = "--actors") -> tuple[int, int]:
    """`N` (a fixed pool) or `MIN:MAX` (autoscaling), for `flag`."""
    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"{flag} {text}: expected N or MIN:MAX") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise ValueError(f"{flag} {text}: need 1 <= MIN <= MAX")
    return pair


def import_ray(extra: str = "data") -> Any:
    """Ray with the library `extra` needs (`data`: r2r-run --ray; `serve`: r2r-serve), else an ImportError saying
    which extra to install."""
    try:
        import ray
        importlib.import_module(f"ray.{extra}")
    except ImportError as exc:
        raise ImportError(INSTALL_HINT if extra == "data" else f"this needs Ray {extra}: pip install 'r2r[{extra}]'"
                          ) from exc
    return ray


@contextmanager
def ray_session(address: str, extra: str = "data") -> Iterator[Any]:
    """Connected to the cluster at `address` for the block (`local` starts one here on every core, and stops it
    after); `extra`: the Ray library the caller needs (`import_ray`)."""
    ray = import_ray(extra)
    if ray.is_initialized():  # the caller connected already (e.g. with its own runtime_env)
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address == "local":
        # address="local": a new cluster even where a `ray start` left its address behind (ray.init() would join it)
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    else:
        ray.init(address=address, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def record(input_path: str, output: str, status: str, error: str = "", seconds: float = 0.0,
           params: str = "", written: bool = False) -> dict[str, Any]:
    """One line of results.jsonl (`written`: this attempt wrote the PNG; False where a dead attempt had)."""
    return {"input": input_path, "output": output, "status": status, "error": error, "seconds": round(seconds, 4),
            "params": params, "written": written}


def plan(paths: list[Location], output: Location, prepared: PreparedRun, cfg: RunConfig, resume: bool
         ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The batches (items: input, output, placement) and the records known before translating (skipped, failed)."""
    phash = params_hash(prepared.params)
    known: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for p in paths:
        try:
            out = output_path_for(p, output)
            if resume and is_complete(out, prepared.params):
                known.append(record(str(p), str(out), "skipped", params=phash))
                continue
            w, h = oriented_size(p)
        except ImageReadError as exc:
            known.append(record(str(p), "", "failed", str(exc), params=phash))
            continue
        pl = place(w, h, prepared.sizes, cfg.fit, cfg.max_pixels)
        items.append({"input": str(p), "output": str(out), "placement": asdict(pl)})
    batches = list(group_by_size(items, lambda it: tuple(it["placement"]["run"]), cfg.batch))
    return batches, known


def placement_from(d: dict[str, Any]) -> Placement:
    """A Placement from its JSON form (a batch row carries it from the driver to the actor)."""
    return Placement(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def decode_batch(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data task: one batch's images read, decoded and placed at their run size (stacked: one size)."""
    items, images, failed = [], [], []
    for it in json.loads(row["items"]):
        pl = placement_from(it["placement"])
        try:
            img = load_rgb(it["input"])
            if (img.shape[1], img.shape[0]) != pl.source:
                raise ImageReadError(f"{it['input']}: decoded at {img.shape[1]}x{img.shape[0]}, not its header's "
                                     f"{pl.source[0]}x{pl.source[1]}")
        except ImageReadError as exc:
            failed.append(record(it["input"], "", "failed", str(exc)))
            continue
        items.append(it)
        images.append(prepare(img, pl))
    stack = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return {"items": json.dumps(items), "images": stack, "failed": json.dumps(failed)}


class TranslateActor:
    """A Ray Data actor: opens the prepared run once (a `Translator`), then translates batches and writes their
    PNGs."""

    def __init__(self, cfg: RunConfig, params: dict[str, Any]) -> None:
        from r2r.runtime.translator import Translator

        self.translator = Translator.from_config(cfg, log=lambda s: None)
        if self.translator.params != params:  # a worker must run exactly what the driver planned
            raise RuntimeError(f"this worker's run differs from the driver's: {self.translator.params} vs {params}")
        self.params, self.phash = params, params_hash(params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records: list[dict[str, Any]] = []
        for items, images, failed in zip(batch["items"], batch["images"], batch["failed"], strict=True):
            records += [{**r, "params": self.phash} for r in json.loads(failed)]
            records += self.translate(json.loads(items), np.asarray(images))
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}

    def translate(self, items: list[dict[str, Any]], images: np.ndarray) -> list[dict[str, Any]]:
        if not items:
            return []
        t0 = time.perf_counter()
        records = []
        try:
            outs: list[np.ndarray | None] = list(self.translator.translate_batch(list(images)))
        except DegenerateOutput as exc:  # the batch's other images are delivered
            outs = exc.outputs
            records += [record(it["input"], it["output"], "failed", f"not delivered: {exc.problems[i]}",
                               params=self.phash) for i, it in enumerate(items) if i in exc.problems]
        except (RuntimeError, ValueError, OSError) as exc:
            return [record(it["input"], it["output"], "failed", str(exc), params=self.phash) for it in items]
        seconds = (time.perf_counter() - t0) / len(items)
        for it, img in zip(items, outs, strict=True):
            if img is None:
                continue
            out = storage.location(it["output"])
            written = not is_complete(out, self.params)  # complete: an attempt that died wrote it already
            try:
                if written:
                    image = restore(img, placement_from(it["placement"]))
                    write_output(out, image, self.params, storage.name_of(storage.location(it["input"])))
                records.append(record(it["input"], it["output"], "ok", "", seconds, self.phash, written))
            except OSError as exc:
                records.append(record(it["input"], it["output"], "failed", str(exc), seconds, self.phash))
        return records


class ResultsLog:
    """OUT/results.jsonl: one JSON line per input, appended and flushed as results arrive. For a URL output the
    lines go to `local` (a temporary file unless given) and the whole file is uploaded every `upload_every` seconds
    and on close."""

    def __init__(self, output: Location, local: Path | None = None, upload_every: float = UPLOAD_EVERY_S) -> None:
        self.target = storage.child(output, RESULTS_FILE)
        if isinstance(self.target, Path):
            self.local = self.target
        else:
            self.local = local or Path(tempfile.mkdtemp(prefix="r2r-results-")) / RESULTS_FILE
        self._fh = open(self.local, "w", encoding="utf-8")  # noqa: SIM115  (held for the run)
        self._upload_every, self._uploaded = upload_every, time.monotonic()

    def add(self, rec: dict[str, Any]) -> None:
        self._fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if time.monotonic() - self._uploaded >= self._upload_every:
            self.upload()

    def upload(self) -> None:
        """The local lines, whole, at the URL target (nothing to do for a local output)."""
        if isinstance(self.target, str):
            storage.write_bytes(self.target, self.local.read_bytes())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        self._fh.close()
        self.upload()


def translate_on_ray(prepared: PreparedRun, cfg: RunConfig, paths: list[Location], output: Location,
                     ray_cfg: RayConfig, resume: bool = False, translator: type[TranslateActor] = TranslateActor,
                     on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Translate `paths` into `output` on the connected cluster; returns every record (also in results.jsonl)."""
    import ray
    import ray.data

    storage.make_dirs(output)
    batches, known = plan(paths, output, prepared, cfg, resume)
    results = ResultsLog(output)
    if results.local != results.target:
        log(f"r2r-run: records kept in {results.local}, uploaded to {results.target} every {UPLOAD_EVERY_S:g} s")
    records: list[dict[str, Any]] = []

    def add(rec: dict[str, Any]) -> None:
        rec = {**rec, "finished_at": round(time.time(), 3)}  # when the driver had it
        results.add(rec)
        records.append(rec)
        if on_record is not None:
            on_record(rec)

    try:
        for rec in known:
            add(rec)
        if batches:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # r2r-run draws its own, in images
            ds = ray.data.from_items([{"items": json.dumps(b)} for b in batches], override_num_blocks=len(batches))
            lo, hi = ray_cfg.pool(ray.cluster_resources())
            # decoding takes no CPU slot: the actors hold them all, and a task waiting for one would stall the stream
            ds = ds.map(decode_batch, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2 * hi))
            resources = {"num_gpus": ray_cfg.gpus} if ray_cfg.gpus else {"num_cpus": ray_cfg.threads}
            pool = (ray.data.ActorPoolStrategy(size=lo) if lo == hi
                    else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi))
            ds = ds.map_batches(translator, batch_size=1, compute=pool, batch_format="numpy",
                                fn_constructor_kwargs={"cfg": prepared.config(cfg), "params": prepared.params},
                                **resources)
            for row in ds.iter_rows():
                add(json.loads(row["record"]))
    finally:
        results.close()
    return records


def run_cli(prepared: PreparedRun, cfg: RunConfig, paths: list[Location], output: Location, ray_cfg: RayConfig,
            resume: bool) -> int:
    """`r2r-run --ray`: the run with a progress bar and the summary line; returns the exit code."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", desc="r2r-run --ray", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    counts = {"ok": 0, "failed": 0, "skipped": 0}

    def on_record(rec: dict[str, Any]) -> None:
        counts[rec["status"]] += 1
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{counts['ok'] / elapsed:.2f} img/s" if elapsed > 0 else "")

    with ray_session(ray_cfg.address) as ray:
        lo, hi = ray_cfg.pool(ray.cluster_resources())
        records = translate_on_ray(prepared, cfg, paths, output, ray_cfg, resume, on_record=on_record)
    bar.close()
    elapsed = time.perf_counter() - start
    actors = f"{lo} actors" if lo == hi else f"{lo}..{hi} actors"
    log(f"r2r-run: {counts['ok']} written, {counts['skipped']} skipped (complete), {counts['failed']} failed in "
        f"{elapsed:.1f} s ({counts['ok'] / elapsed:.2f} img/s; {prepared.describe()}; Ray {ray_cfg.address}, "
        f"{actors} x {ray_cfg.threads} threads) -> {output} (records: {storage.child(output, RESULTS_FILE)})")
    for rec in records:
        if rec["status"] == "failed":
            log(f"  failed: {rec['input']}: {rec['error']}")
    return 1 if counts["failed"] else 0


__all__ = ["RESULTS_FILE", "RayConfig", "ResultsLog", "TranslateActor", "decode_batch", "import_ray", "parse_actors",
           "placement_from", "plan", "ray_session", "record", "run_cli", "translate_on_ray"]
