"""`r2r-serve`: the Translator as an HTTP service on Ray Serve. The run is prepared here once (bundle, engines, the
first-use check), pinned, and served by the application of serve/deployment.py; Ctrl-C or SIGTERM stops it (in-flight
requests finish; the local Ray it started stops with it). Why: docs/serving.md."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, cast

import click

from r2r.config import Inversion, Method
from r2r.errors import R2RError
from r2r.log import log
from r2r.options import threads_option
from r2r.runtime.assembly import REFERENCE, FusedChoice, prepare_run
from r2r.runtime.cli import translator_options
from r2r.runtime.ray_run import parse_actors, ray_session
from r2r.runtime.translator import run_config
from r2r.serve.app import ServeSettings
from r2r.serve.deployment import Scaling, application
from r2r.sizing import Fit
from r2r.source import ModelSource

TOKEN_ENV = "R2R_SERVE_TOKEN"
APP_NAME = "r2r"


def read_token(path: Path | None) -> str | None:
    """The bearer token: the file's first line, else the environment variable; None: no auth."""
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = (path.read_text(encoding="utf-8").strip().splitlines() or [""])[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path}: cannot read a token ({exc})", param_hint="'--auth-token-file'") from exc
    if len(token) < 16:
        raise click.BadParameter(f"{path}: a token of at least 16 characters", param_hint="'--auth-token-file'")
    return token


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@translator_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --auth-token-file).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", default="1", show_default=True, metavar="N|MIN:MAX",
              help="Translation replicas: a fixed number, or autoscaling between MIN and MAX.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images of one run size a replica translates together (the bundle is exported for it).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0, max=10_000), default=10.0, show_default=True,
              help="How long a replica waits to fill a batch.")
@click.option("--max-queued", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting per deployment before a 503 with Retry-After.")
@threads_option(help="CPU threads per replica's backend session (0: all cores).")
@click.option("--ray", "ray_address", default="local", show_default=True, metavar="ADDRESS",
              help="local (a Ray started for this service, stopped with it), auto (join RAY_ADDRESS) or "
                   "ray://host:port.")
@click.option("--auth-token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"A file whose first line is the bearer token every request must carry [default: ${TOKEN_ENV} "
                   "if set; else no auth].")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="An origin browsers may call from (repeatable) [default: none, no CORS headers].")
@click.option("--max-body-mb", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="The largest request body; a larger one is a 413.")
def main(engine: Path | None, backend: str, source: ModelSource, width: int | None, height: int | None, fit: str,
         max_pixels: int | None, method: Method, inversion: str, fused: str, precision: str | None, device: str,
         host: str, port: int, replicas: str, max_batch_size: int, batch_wait_ms: float, max_queued: int,
         threads: int, ray_address: str, auth_token_file: Path | None, cors_origins: tuple[str, ...],
         max_body_mb: int) -> None:
    """Serve FashionR2R over HTTP: the page at /, /v1/translate, A1111's /sdapi/v1/img2img, /healthz, /readyz,
    /metrics."""
    if backend == REFERENCE:
        raise click.UsageError("--backend reference runs in one process; r2r-serve serves a bundle backend")
    try:
        lo, hi = parse_actors(replicas, "--replicas")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--replicas'") from exc
    token = read_token(auth_token_file)
    try:
        cfg = run_config(source, engine, backend, precision, device, max_batch_size, threads, cast(Fit, fit),
                         max_pixels, method, cast(Inversion, inversion), cast(FusedChoice, fused), width, height)
        prepared = prepare_run(cfg)  # exported, built and tried here once; the replicas open the pinned run
    except (R2RError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    settings = ServeSettings(method=prepared.method, max_body_bytes=max_body_mb << 20, max_batch_size=max_batch_size,
                             auth_token=token, cors_origins=cors_origins)
    scaling = Scaling(lo, hi, max_batch_size, batch_wait_ms / 1000, max_queued, cpus=float(threads or 1),
                      gpus=1.0 if prepared.device == "cuda" else 0.0)
    try:
        serve_until_stopped(application(prepared.config(cfg), settings, scaling), ray_address, host, port,
                            f"{prepared.describe()}, replicas {replicas}, batch {max_batch_size}")
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc


def serve_until_stopped(app: Any, address: str, host: str, port: int, what: str) -> None:
    """Run `app` on Ray Serve at host:port until SIGINT or SIGTERM, then shut it down (Ray Serve lets in-flight
    requests finish) and stop the Ray it started."""
    stop = threading.Event()
    with ray_session(address, "serve") as ray:
        from ray import serve

        def on_signal(*_: object) -> None:
            if stop.is_set() or not serving.is_set():  # still deploying (or a second signal): stop at once
                raise KeyboardInterrupt
            stop.set()

        serving = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which may install its own
            signal.signal(sig, on_signal)

        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            serving.set()
            gcs = ray.get_runtime_context().gcs_address
            log(f"r2r-serve: {what}; Ray at {gcs}")
            print(f"r2r-serve: ready at http://{_url_host(host)}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
            log("r2r-serve: stopping (in-flight requests finish)")
        except KeyboardInterrupt:
            log("r2r-serve: stopped before it was ready")
        finally:
            serve.shutdown()
    log("r2r-serve: stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["TOKEN_ENV", "main", "read_token", "serve_until_stopped"]


if __name__ == "__main__":
    main()
