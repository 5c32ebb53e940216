"""`r2r-bench serve`: `r2r-serve` under a bounded load on 127.0.0.1 (an async httpx loop: N requests, at most C in
flight), at each concurrency, with batching on (`--max-batch-size B`) and off (1): latency percentiles, images/s and
errors, beside `r2r-run`'s images/s on the same renders, same bundle, backend and threads (docs/serving.md).

Each configuration is the command itself, started fresh (a subprocess, its own local Ray), warmed by one request of
each size, then measured; it is stopped with SIGTERM before the next starts. Latency is what a client sees: from
sending the request to the last byte of the answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from r2r.benchmarks.scale_out import RUN, _renders, _summary_rate, _timed
from r2r.log import log

SERVE = [sys.executable, "-m", "r2r.serve.cli"]


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


class Server:
    """`r2r-serve` as a subprocess: started, waited for, stopped with SIGTERM (its exit status checked)."""

    def __init__(self, args: list[str], ready_timeout_s: float = 300) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([*SERVE, *args, "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        lines: list[str] = []
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline() if self.proc.stderr else ""
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"r2r-serve exited with {self.proc.returncode}:\n{''.join(lines[-20:])}")
            lines.append(line)
            if "r2r-serve: ready at" in line:
                break
        else:
            self.stop()
            raise RuntimeError(f"r2r-serve was not ready in {ready_timeout_s:.0f} s:\n{''.join(lines[-20:])}")
        self.log = "".join(lines)  # what it printed up to "ready" (the Ray address among it)
        # what it prints after is read and dropped, so that a full pipe never blocks it
        threading.Thread(target=_drain, args=(self.proc.stderr,), daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}/"
        self.url = self.base + "v1/translate"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def _load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` POSTs of the bodies in turn, at most `concurrency` in flight: latencies, statuses, wall time."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    batches: list[int] = []
    run_s: list[float] = []  # the replica's translation of the request's batch (X-R2R-Run-Seconds)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, k: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, content=bodies[k % len(bodies)], headers={"content-type": "image/png"})
                status = str(r.status_code)
                if r.status_code == 200:
                    batches.append(int(r.headers.get("x-r2r-batch", "1")))
                    run_s.append(float(r.headers.get("x-r2r-run-seconds", "nan")))
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, k) for k in range(requests)))
        wall = time.perf_counter() - start
    lat = np.array(latencies)
    ok = statuses.get("200", 0)
    return {"concurrency": concurrency, "requests": requests, "ok": ok, "errors": requests - ok,
            "statuses": statuses, "wall_s": round(wall, 3), "images_per_s": ok / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99)), "mean_batch": float(np.mean(batches)) if batches else 0.0,
            "mean_run_s": float(np.mean(run_s)) if run_s else float("nan")}


def serve_report(out: Path, requests: int = 32, concurrencies: tuple[int, ...] = (1, 4, 16), batch: int = 4,
                 threads: int = 0, size: tuple[int, int] = (256, 256)) -> dict[str, Any]:
    from r2r.runtime.assembly import RunConfig, prepare_run

    renders = out / "serve-renders"
    _renders(renders, min(requests, 8), size)
    bodies = [p.read_bytes() for p in sorted(renders.glob("*.png"))]
    prepared = prepare_run(RunConfig(batch=batch))  # the embedded default's bundle and engines, built once here
    engine = ["--engine", str(prepared.root), "--backend", prepared.row.name, "--precision", prepared.precision,
              "--threads", str(threads)]
    log(f"r2r-bench serve: {requests} requests of {len(bodies)} renders {size[0]}x{size[1]}, {prepared.row.name} "
        f"{prepared.precision}, concurrency {', '.join(map(str, concurrencies))}")
    rows = []
    for max_batch in (batch, 1):
        server = Server([*engine, "--max-batch-size", str(max_batch), "--batch-wait-ms", "10"])
        try:
            asyncio.run(_load(server.url, bodies, len(bodies), len(bodies)))  # warm: every replica path once
            for c in concurrencies:
                row = {"batching": "on" if max_batch > 1 else "off", "max_batch_size": max_batch,
                       **asyncio.run(_load(server.url, bodies, requests, c))}
                log(f"  batch {max_batch} concurrency {c:>2}: {row['images_per_s']:.2f} img/s, p50 "
                    f"{row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, p99 {row['p99_s']:.2f} s, errors "
                    f"{row['errors']}, mean batch {row['mean_batch']:.2f} run in {row['mean_run_s']:.2f} s")
                rows.append(row)
        finally:
            code = server.stop()
        if code != 0:
            raise RuntimeError(f"r2r-serve exited with {code} on SIGTERM")
    # r2r-run on the same renders, repeated to the same image count, as one process at the server's batch
    folder = out / "serve-run-in"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(requests):
        (folder / f"r{k:03d}.png").write_bytes(bodies[k % len(bodies)])
    wall, text = _timed([*RUN, *engine, "--batch-size", str(batch), "--input", str(folder), "--output",
                         str(out / "serve-run-out")])
    run = {"batch": batch, "images": requests, "wall_s": round(wall, 2), "images_per_s_wall": requests / wall,
           "images_per_s_after_load": _summary_rate(text)}
    log(f"  r2r-run, batch {batch}: {run['images_per_s_after_load']:.2f} img/s after load "
        f"({run['images_per_s_wall']:.2f} with start-up)")
    return {"backend": prepared.row.name, "precision": prepared.precision, "size": list(size),
            "renders": len(bodies), "threads": threads, "rows": rows, "r2r_run": run}


__all__ = ["Server", "free_port", "serve_report"]
