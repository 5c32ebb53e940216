"""`GET /metrics` of `r2r-serve`, in Prometheus' text format: requests by route and status, their latency, the
images waiting for a replica, the batch each image ran in, images translated and their recent rate. Kept by the
ingress (every request passes it), in a registry of its own per app (no process-wide state). Why: docs/serving.md,
"Metrics"."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Routes are labelled by their template; any other path is "other" (a label per path would let a client grow the
# series without bound).
ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/translate", "/v1/translate/events", "/sdapi/v1/img2img")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0


class Metrics:
    """The service's counters, one registry per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int = 16) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("r2r_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("r2r_request_seconds", "Time from request to answer, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queued = Gauge("r2r_images_in_flight", "Images handed to the translation replicas, not yet answered "
                            "(queued or running)", registry=r)
        self.batch = Histogram("r2r_batch_size", "The batch each translated image ran in",
                               buckets=tuple(float(b) for b in range(1, max(max_batch_size, 1) + 1)), registry=r)
        self.images = Counter("r2r_images", "Images translated", registry=r)
        self.rate = Gauge("r2r_images_per_second", f"Images translated per second over the last {RATE_WINDOW_S:g} s",
                          registry=r)
        self.rate.set_function(self._rate)
        self._done: deque[float] = deque()

    def route(self, path: str) -> str:
        return path if path in ROUTES else "other"

    def answered(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def translated(self, batch: int) -> None:
        self.images.inc()
        self.batch.observe(batch)
        self._done.append(time.monotonic())

    def _rate(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        while self._done and self._done[0] < cutoff:
            self._done.popleft()
        return len(self._done) / RATE_WINDOW_S

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
