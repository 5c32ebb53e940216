"""`r2r-bench`: latency, throughput, memory and fidelity of every backend beside the baselines.

Each configuration runs in its own process on the same images with the same parameters; ratios are
taken between configurations of one run. Reports: report.json (every figure), report.md, charts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from r2r import graph_io
from r2r.benchmarks.worker import BenchConfig
from r2r.config import ATTENTION_POOLS, MAX_CACHE_INTERVAL, Method, Variant
from r2r.log import log
from r2r.metrics import psnr
from r2r.options import model_source_options, resolve_source, threads_option
from r2r.runtime.trial import signal_name
from r2r.sizing import SizeRange
from r2r.source import ModelSource


def make_images(out: Path, count: int, width: int, height: int, seed: int = 1234) -> Path:
    """Procedural renders (the dataset generator's rendered domain), seeded."""
    from r2r.training.data import render_pair, sample_design

    imgs = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        rendered, _ = render_pair(sample_design(rng, (width, height)), (width, height))
        imgs.append(rendered)
    path = out / "inputs.npz"
    np.savez_compressed(path, images=np.stack(imgs))
    return path


def run_config(cfg: BenchConfig, work: Path, timeout: float = 3600) -> dict:
    cfg_path = work / f"{cfg.name}.json"
    res_path = work / f"{cfg.name}.result.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "r2r.benchmarks.worker", str(cfg_path), str(res_path)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise click.ClickException(f"benchmark {cfg.name} {exit_reason(proc.returncode)}:\n"
                                   + ("\n".join(proc.stderr.strip().splitlines()[-6:]) or "(it printed nothing)"))
    result = json.loads(res_path.read_text())
    log(f"  {cfg.name:<40} {time.perf_counter() - t0:6.1f} s")
    return result


def exit_reason(returncode: int) -> str:
    """How a worker process ended, in words: a signal by name (a crash of an engine's native code is SIGSEGV)."""
    if returncode < 0:
        return f"crashed ({signal_name(returncode)})"
    return f"failed (exit code {returncode})"


def _portable_args(args: list[str]) -> list[str]:
    """The command as run, with absolute paths shown by name (reports travel between machines)."""
    return [Path(a).name if a.startswith("/") else a for a in args]



def host_overhead(bundle: Path, work: Path, repeats: int = 30) -> dict:
    """The scheduler's own time per denoising step, on null graphs with the bundle's I/O: the fused program, and
    emit + inject where the bundle has those graphs (a `--bundle` of the default program's alone has not)."""
    from r2r.benchmarks.null_graphs import make_null_bundle
    from r2r.manifest import read_manifest
    from r2r.runtime.assembly import RunConfig
    from r2r.runtime.scheduler import program_graphs
    from r2r.runtime.translator import Translator

    null = make_null_bundle(bundle, work / "null-bundle")
    has = set(read_manifest(null).graphs)
    out = {}
    for fused in (False, True):
        if not set(program_graphs(Variant(fused=fused))) <= has:
            continue
        runtime = Translator.from_config(RunConfig(engine=null, backend="onnxruntime", device="cpu",
                                                   fused="on" if fused else "off", threads=1),
                                         log=lambda _: None).runtime
        sched = runtime.scheduler
        assert sched is not None
        s = sched.plan.stages
        loop = sched.plan.ops[s["inversion"].start : s["generation"].stop]
        steps = 2 * sched.schedule.n
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            sched.backend.execute(loop, key=0)
            times.append((time.perf_counter() - t0) / steps)
        times = sorted(times[1:])
        out["fused" if fused else "emit+inject"] = {"ms_per_step_min": times[0] * 1e3,
                                                    "ms_per_step_median": times[len(times) // 2] * 1e3,
                                                    "ops": len(loop), "steps": steps}
    return out


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"--size {text!r}: WxH, e.g. 512x512") from None
    if w % 8 or h % 8 or w < 64 or h < 64:
        raise click.BadParameter(f"--size {text}: sides of at least 64, multiples of 8")
    return w, h


def attention_report(bundle: Path, work: Path, threads: int, width: int, height: int) -> list[dict]:
    """`--attention`: one profiled routed-UNet call at width x height per engine (benchmarks/attention.py), each in
    its own process."""
    from r2r.benchmarks.attention import AttentionConfig
    from r2r.engines.onnxruntime import ROW as ORT
    from r2r.manifest import read_manifest

    m = read_manifest(bundle)
    plain = bundle / m.graphs["unet"].file
    mha = bundle / m.engines[ORT.slot("cpu", "fp32", "unet")].files[0]
    at = {"width": width, "height": height, "multiple": int(m.sizes["multiple"]), "threads": threads}
    configs = [AttentionConfig("onnxruntime-plain-attention", "onnxruntime", str(plain), **at),
               AttentionConfig("onnxruntime-multi-head-attention", "onnxruntime", str(mha), **at),
               AttentionConfig("openvino-fp32", "openvino", str(plain), precision="fp32", **at),
               AttentionConfig("openvino-bf16", "openvino", str(plain), precision="bf16", **at)]
    results = []
    for c in configs:
        cfg_path, res_path = work / f"{c.name}.attention.json", work / f"{c.name}.attention.result.json"
        cfg_path.write_text(json.dumps(asdict(c)))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "r2r.benchmarks.attention", str(cfg_path), str(res_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # e.g. killed for memory: that is the measurement
            results.append({"config": asdict(c), "failed": proc.stderr.strip().splitlines()[-1:] or
                            [f"exit code {proc.returncode}"]})
        else:
            results.append(json.loads(res_path.read_text()))
        log(f"  {c.name:<40} {time.perf_counter() - t0:6.1f} s")
    return results


LEGACY = {"--attention": "attention", "--padding": "padding", "--ray": "ray", "--gpu-check": "gpu-check"}


class _Commands(click.Group):
    """`r2r-bench` as it was (`r2r-bench --quick`, `r2r-bench --attention ...`) still runs, as the subcommand it now
    is, with a note (for one release)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
            mode = next((LEGACY[a] for a in args if a in LEGACY), "run")
            args = [mode, *(a for a in args if a not in LEGACY)]
            log(f"r2r-bench: flags without a subcommand are `r2r-bench {mode} ...` now; this form goes in the next "
                "release")
        return super().parse_args(ctx, args)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark r2r's backends beside the public code and the PyTorch reference (`run`), and where the time goes
    (`attention`, `padding`, `ray`, `serve`, `gpu-check`)."""


def _model_options(f: Any) -> Any:
    """What a benchmark measures: the model (or --sd15), its size, its bundle, the threads, the report folder."""
    for opt in reversed([
        click.option("--quick", is_flag=True, help="The embedded default, 2 images, batch 1-2, 2 repeats (< 3 min)."),
        model_source_options,
        click.option("--sd15", is_flag=True, help="Benchmark an SD 1.5-architecture model (random weights)."),
        click.option("--size", default=None, metavar="WxH",
                     help="Image size [default: the model's own; 256x256 for --sd15 and the embedded default]."),
        click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True),
        threads_option(help="Threads per configuration [default: all cores]."),
        click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
                     help="Use this exported bundle of the model instead of exporting one into --out."),
    ]):
        f = opt(f)
    return f


@dataclass
class _Subject:
    """The model under test, its size and its bundle (exported into --out, with ONNX Runtime's engines)."""

    model: Path
    embedding: Path
    width: int
    height: int
    bundle: Path
    out: Path
    work: Path
    start: float


def _subject(source: ModelSource, sd15: bool, size: str | None, out: Path, bundle_dir: Path | None,
             batch_max: int) -> _Subject:
    from r2r.engines.onnxruntime import build_ort_engines
    from r2r.export.bundle_writer import ExportConfig, export_bundle
    from r2r.manifest import read_manifest, verify_files
    from r2r.models import default_resolution

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    if sd15:
        from r2r.benchmarks.sd15 import build_sd15_architecture

        log("r2r-bench: building the SD 1.5-architecture model (random weights)")
        source = ModelSource(build_sd15_architecture(out / "models" / "sd15-random"), source.lora, source.embedding,
                             source.token)
    resolved = resolve_source(source)
    w, h = _size(size) or default_resolution(resolved.model)
    if bundle_dir is not None:
        bundle, manifest = bundle_dir, read_manifest(bundle_dir)
        verify_files(bundle, manifest)
        if manifest.batch_max < batch_max:
            raise click.BadParameter(f"--bundle supports batches up to {manifest.batch_max}, not {batch_max}")
        sz = manifest.sizes
        if not SizeRange(sz["multiple"], tuple(sz["min"]), tuple(sz["max"]), (w, h)).takes(w, h):
            raise click.BadParameter(f"--bundle takes sides multiples of {sz['multiple']} from {sz['min']} to "
                                     f"{sz['max']}, not {w}x{h}; pass a --size inside that range")
    else:
        bundle = out / "bundles" / f"{resolved.model.name}-{w}x{h}"
        export_bundle(ExportConfig(resolved.model, resolved.embedding, bundle, w, h, batch_max=batch_max),
                      progress=log)
    # Every configuration runs from built engines, as a user's would: ORT's optimized graphs (attention as
    # MultiHeadAttention), OpenVINO's compiled models in the bundle's cache.
    build_ort_engines(bundle, "fp32", "cpu", progress=log)
    return _Subject(resolved.model, resolved.embedding, w, h, bundle, out, work, start)


def _finish(report: dict[str, Any], out: Path, start: float) -> None:
    """The one report writer of every subcommand: report.json, report.md (and charts), and the line that says so."""
    from r2r.benchmarks.report import write_reports

    report = {**report, "command": "r2r-bench " + " ".join(_portable_args(sys.argv[1:])),
              "wall_s": time.perf_counter() - start}
    paths = write_reports(report, out)
    log(f"r2r-bench: done in {report['wall_s']:.0f} s -> {', '.join(str(p) for p in paths)}")


@main.command("gpu-check")
@click.option("--quick", is_flag=True, help="Fewer steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
def gpu_check_cmd(quick: bool, repeats: int, out: Path) -> None:
    """The GPU path's parity and timings on a CUDA machine (benchmarks/gpu-check.md); with no GPU, its CPU
    rehearsal."""
    from r2r.benchmarks.gpu_check import run

    out.mkdir(parents=True, exist_ok=True)
    run(out, quick=quick, repeats=repeats)


@main.command("ray")
@click.option("--images", "n_images", type=click.IntRange(min=1), default=20, show_default=True)
@threads_option(default=2, help="Threads of the one process; as many Ray actors of one thread.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
def ray_cmd(n_images: int, threads: int, out: Path) -> None:
    """One r2r-run process (--threads T) against r2r-run --ray local (T actors x 1 thread) on the same renders."""
    from r2r.benchmarks.scale_out import ray_report
    from r2r.machine import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _finish({"machine": describe_machine(), "ray": ray_report(out, n_images, threads or 2)}, out, start)


@main.command("serve")
@click.option("--requests", "n_requests", type=click.IntRange(min=1, max=1000), default=32, show_default=True,
              help="Requests per concurrency level.")
@click.option("--concurrency", "concurrencies", type=click.IntRange(1, 64), multiple=True, default=(1, 4, 16),
              show_default=True, help="Requests in flight at once (repeatable).")
@click.option("--batch-size", type=click.IntRange(1, 4), default=4, show_default=True,
              help="The server's --max-batch-size with batching on (off: 1), and r2r-run's --batch-size.")
@threads_option()
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
def serve_cmd(n_requests: int, concurrencies: tuple[int, ...], batch_size: int, threads: int, out: Path) -> None:
    """r2r-serve on 127.0.0.1 under a bounded load (latency percentiles, images/s, errors), batching on and off,
    beside r2r-run's images/s on the same renders (the embedded default)."""
    from r2r.benchmarks.serving import serve_report
    from r2r.machine import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = serve_report(out, n_requests, tuple(sorted(set(concurrencies))), batch_size, threads)
    _finish({"machine": describe_machine(), "serve": report}, out, start)


@main.command("padding")
@click.option("--images", "n_images", type=click.IntRange(min=1), default=6, show_default=True)
@threads_option()
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
def padding_cmd(n_images: int, threads: int, out: Path) -> None:
    """Edge-replicated vs white padding of inputs that are not the bundle's multiple (benchmarks/padding.py), on the
    default backend."""
    from r2r.benchmarks.padding import padding_report
    from r2r.machine import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = padding_report(count=n_images, threads=threads)
    for mode, r in result["padding"].items():
        log(f"  {mode:<6} PSNR {r['psnr_db_mean']:.2f} dB, border band {r['border_band_psnr_db_mean']:.2f} dB")
    log(f"r2r-bench: {result['cut']} padded to {result['run']}: {result['better']} is closer")
    _finish({"machine": describe_machine(), **result}, out, start)


@main.command("attention")
@_model_options
def attention_cmd(quick: bool, source: ModelSource, sd15: bool, size: str | None, out: Path, threads: int,
                  bundle_dir: Path | None) -> None:
    """Where a UNet call's time and memory go in attention, per engine (ONNX Runtime's exported pattern vs
    MultiHeadAttention, OpenVINO fp32 / bf16)."""
    from r2r.machine import describe_machine

    s = _subject(source, sd15, size, out, bundle_dir, batch_max=2)
    _finish({"machine": describe_machine(), "model": str(s.model), "resolution": [s.width, s.height],
             "attention": attention_report(s.bundle, s.work, threads, s.width, s.height)}, out, s.start)


@main.command("run")
@_model_options
@click.option("--images", "n_images", type=click.IntRange(min=1), default=None, help="[default: 2 quick, 4 full]")
@click.option("--batch-sizes", default=None, help="Comma list [default: 1,2 quick; 1,2,4 full].")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed passes after the warm-up [default: 2 quick, 3].")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="An untimed pass first (skip it only where one pass costs minutes).")
@click.option("--only", default=None, help="Comma list of configuration names to run (torch-reference always runs: "
              "it is the fidelity reference; name public-code to keep the baseline).")
@click.option("--static", "static_too", is_flag=True,
              help="Also run a static bundle (graphs of --size only) beside the default dynamic-size one, on "
                   "onnxruntime fp32 and openvino: what serving a range of sizes costs.")
@click.option("--attention-pool", "pools", type=click.Choice([str(p) for p in ATTENTION_POOLS[1:]]), multiple=True,
              help="Also run a bundle exported with this attention pool (repeatable), on onnxruntime fp32 and "
                   "openvino bf16: its speed, and its distance from the full method in the fidelity column.")
@click.option("--cache-interval", "intervals", type=click.IntRange(2, MAX_CACHE_INTERVAL), multiple=True,
              help="Also run step caching at this interval (repeatable), on onnxruntime fp32 and openvino bf16, and "
                   "with each --attention-pool on openvino bf16 (bundles with the step-cache graphs).")
def run_cmd(quick: bool, source: ModelSource, sd15: bool, size: str | None, out: Path, threads: int,
            bundle_dir: Path | None, n_images: int | None, batch_sizes: str | None, repeats: int | None,
            warmup: bool, only: str | None, static_too: bool, pools: tuple[str, ...], intervals: tuple[int, ...]
            ) -> None:
    """Every backend beside the `public-code` baseline and the PyTorch reference, same images and parameters."""
    sizes = [int(x) for x in (batch_sizes or ("1,2" if quick else "1,2,4")).split(",")]
    repeats = repeats or (2 if quick else 3)
    n_images = n_images or (2 if quick else 4)
    if any(n_images % b for b in sizes):
        raise click.BadParameter(f"--images {n_images} must be a multiple of every batch size {sizes}")
    s = _subject(source, sd15, size, out, bundle_dir, batch_max=max(sizes))
    log(f"r2r-bench: {s.model} at {s.width}x{s.height}; images {n_images}, batch sizes {sizes}, repeats {repeats}")
    configs, default = _configs(s, sizes, n_images, repeats, warmup, threads, only, static_too,
                                tuple(int(p) for p in pools), intervals)
    log(f"r2r-bench: {len(configs)} configurations, each in its own process")
    results = [run_config(c, s.work) for c in configs]
    ref_out = np.load(s.work / "torch-reference.out.npz")["images"]
    for r in results:
        got = np.load(r["config"]["outputs"])["images"]
        r["fidelity_vs_torch_reference"] = {
            "psnr_db": [psnr(a, b) for a, b in zip(got, ref_out, strict=True)],
            "max_abs_error": int(np.abs(got.astype(int) - ref_out.astype(int)).max())}
    from r2r.machine import describe_machine

    _finish({"machine": describe_machine(), "model": str(s.model), "resolution": [s.width, s.height],
             "images": n_images, "repeats": repeats, "warmup": warmup, "batch_sizes": sizes,
             "method": "defaults (steps 50, strength 0.3, guidance 7.5, TAC ratio 0.9, divisor 256)",
             "results": results, "host_overhead": host_overhead(s.bundle, s.work), "default": default}, out, s.start)


def _pool_rows(pool: int, intervals: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """The rows a pooled (or step-cache) bundle runs, as (name, backend, cache interval): the pool alone and with each
    interval on openvino bf16 and onnxruntime fp32 (pool 1: the intervals alone; the interval with a pool: openvino
    bf16 only)."""
    rows = [(f"onnxruntime-fp32-pool{pool}-b1", "onnxruntime", 1), (f"openvino-bf16-pool{pool}-b1", "openvino", 1)] \
        if pool > 1 else []
    for k in intervals:
        tag = (f"pool{pool}-" if pool > 1 else "") + f"cache{k}"
        if pool == 1:
            rows.append((f"onnxruntime-fp32-{tag}-b1", "onnxruntime", k))
        rows.append((f"openvino-bf16-{tag}-b1", "openvino", k))
    return rows


def _build_engines(s: _Subject, sizes: list[int], threads: int, only: str | None, static_too: bool,
                   pools: tuple[int, ...] = (), intervals: tuple[int, ...] = ()
                   ) -> tuple[bool, Path | None, dict[int, Path]]:
    """The engines the configurations of a run open, as a user's would: OpenVINO's compiled models (and its INT8
    UNet where NNCF is installed), a static bundle's with --static, a pooled bundle's per --attention-pool (and with
    `intervals`, a bundle of the step-cache program per pool, 1 included); with --only, those of the rows kept alone
    (an SD 1.5 engine costs minutes and gigabytes). Returns (INT8 built, the static bundle, the pooled bundles by
    pool: 1 only with `intervals`)."""
    from r2r.engines.onnxruntime import build_ort_engines
    from r2r.engines.openvino import INT8_UNET, build_ov_engines
    from r2r.export.bundle_writer import ExportConfig, export_bundle
    from r2r.manifest import read_manifest
    from r2r.runtime.scheduler import program_graphs

    kept = set(only.split(",")) if only else None

    def wanted(*names: str) -> bool:
        return kept is None or bool(kept & set(names))

    bundle = s.bundle
    for prec in ("fp32", "bf16"):
        if wanted(f"openvino-{prec}-b1", f"openvino-{prec}-single-pass-b1"):
            build_ov_engines(bundle, prec, threads, progress=log)
    int8 = importlib.util.find_spec("nncf") is not None and wanted("openvino-int8-b1")
    if int8:
        from r2r.engines.int8 import build_int8_unet

        if read_manifest(bundle).engines.get(INT8_UNET) is None:
            build_int8_unet(bundle, s.model, s.embedding, progress=log)
        build_ov_engines(bundle, "int8", threads, progress=log)
    static = None
    if static_too:
        static = s.out / "bundles" / f"{s.model.name}-{s.width}x{s.height}-static"
        export_bundle(ExportConfig(s.model, s.embedding, static, s.width, s.height, batch_max=max(sizes),
                                   static=True), progress=log)
        build_ort_engines(static, "fp32", "cpu", progress=log)
        for prec in ("fp32", "bf16"):
            build_ov_engines(static, prec, threads, progress=log)
    pooled = {}
    for pool in ((1,) if intervals else ()) + pools:
        rows = _pool_rows(pool, intervals)
        if not wanted(*(name for name, _, _ in rows)):
            continue
        step_cache = bool(intervals)
        name = f"{s.model.name}-{s.width}x{s.height}" + (f"-pool{pool}" if pool > 1 else "") \
            + ("-stepcache" if step_cache else "")
        pooled[pool] = s.out / "bundles" / name
        # the graphs of the fused program its rows run: with the pool alone (`unet`) and with step caching
        graphs = program_graphs(Variant(fused=True), True, step_cache) if pool == 1 else \
            program_graphs(Variant(fused=True), True) + (graph_io.STEP_CACHE_GRAPHS if step_cache else ())
        export_bundle(ExportConfig(s.model, s.embedding, pooled[pool], s.width, s.height, batch_max=max(sizes),
                                   graphs=graphs, attention_pool=pool, donors=(bundle,)), progress=log)
        if wanted(*(n for n, backend, _ in rows if backend == "onnxruntime")):
            build_ort_engines(pooled[pool], "fp32", "cpu", progress=log)
        build_ov_engines(pooled[pool], "bf16", threads, progress=log)
    return int8, static, pooled


def _configs(s: _Subject, sizes: list[int], n_images: int, repeats: int, warmup: bool, threads: int,
             only: str | None, static_too: bool, pools: tuple[int, ...] = (), intervals: tuple[int, ...] = ()
             ) -> tuple[list[BenchConfig], str]:
    """The configurations of a run (their engines built first), and the one `r2r-run` runs by default here."""
    from r2r.backends import auto_choices
    from r2r.models import model_defaults

    bundle = s.bundle
    model_k = model_defaults(s.model).cache_interval  # r2r-run's default runs it: always a row
    intervals = tuple(sorted(set(intervals) | ({model_k} if model_k > 1 else set())))
    int8, static, pooled = _build_engines(s, sizes, threads, only, static_too, pools, intervals)
    images = make_images(s.work, n_images, s.width, s.height)
    default_row, _ = auto_choices()[0]
    default = (default_row.name, default_row.native_precision())
    # the full program unless a row says otherwise (the main bundle carries no step-cache graphs)
    common = {"model": str(s.model), "embedding": str(s.embedding), "width": s.width, "height": s.height,
              "images": str(images), "method": Method(cache_interval=1), "repeats": repeats, "threads": threads,
              "warmup": warmup}
    default_bundle = str(bundle) if model_k == 1 else str(pooled.get(1, ""))

    def cfg(name: str, kind: str, **kw: Any) -> BenchConfig:
        is_default = kind == "r2r" and (kw.get("backend", "onnxruntime"), kw.get("precision", "fp32")) == default \
            and kw.get("inversion", "exact") == "exact" and kw.get("batch", 1) == 1 and kw.get("fused", True) \
            and kw.get("bundle") == default_bundle and kw.get("method", common["method"]).interval == model_k
        return BenchConfig(name=name, kind=kind, outputs=str(s.work / f"{name}.out.npz"), default=is_default,
                           **{**common, **kw})

    configs = [cfg("public-code", "public-code"), cfg("torch-reference", "torch-reference")]
    for b in sizes:
        configs.append(cfg(f"onnxruntime-fp32-b{b}", "r2r", bundle=str(bundle), batch=b))
    configs.append(cfg("onnxruntime-fp32-emit-inject-b1", "r2r", bundle=str(bundle), fused=False))
    configs.append(cfg("onnxruntime-fp32-single-pass-b1", "r2r", bundle=str(bundle), inversion="single-pass",
                       fused=False))
    for prec in ("fp32", "bf16"):
        configs.append(cfg(f"openvino-{prec}-b1", "r2r", bundle=str(bundle), backend="openvino", precision=prec))
    configs.append(cfg("openvino-bf16-single-pass-b1", "r2r", bundle=str(bundle), backend="openvino",
                       precision="bf16", inversion="single-pass", fused=False))
    if int8:
        configs.append(cfg("openvino-int8-b1", "r2r", bundle=str(bundle), backend="openvino", precision="int8"))
    if static is not None:
        configs.append(cfg("onnxruntime-fp32-static-b1", "r2r", bundle=str(static)))
        for prec in ("fp32", "bf16"):
            configs.append(cfg(f"openvino-{prec}-static-b1", "r2r", bundle=str(static), backend="openvino",
                               precision=prec))
    for pool, root in pooled.items():  # the bundle's pool is the method's (Bundle.method)
        for name, backend, k in _pool_rows(pool, intervals):
            configs.append(cfg(name, "r2r", bundle=str(root), method=Method(cache_interval=k),
                               **({"backend": "openvino", "precision": "bf16"} if backend == "openvino" else {})))
    if only:
        keep = {"torch-reference", *only.split(",")}
        unknown = keep - {c.name for c in configs}
        if unknown:
            raise click.BadParameter(f"--only: unknown {sorted(unknown)}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in keep]
    return configs, f"{default[0]} {default[1]}" + (f", step caching K = {model_k}" if model_k > 1 else "")


if __name__ == "__main__":
    main()
