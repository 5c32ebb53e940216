"""`r2r-serve` on Ray Serve: the translation deployment (replicas that each hold one `Translator` and batch the
images of one run size with `serve.batch`), the ingress deployment (the FastAPI app of serve/app.py) and the
application that binds them. Why: docs/serving.md, "How it runs"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from r2r.errors import R2RError
from r2r.imageio import png_bytes
from r2r.runtime.assembly import RunConfig
from r2r.runtime.outputs import output_text
from r2r.runtime.translator import Progress, Translator, params_with_prompt
from r2r.serve.app import Overloaded, ServeSettings, build_app
from r2r.serve.requests import Job, RequestError, Step, Translated

# Queues a replica keeps, one per (run size, request options): the rest run unbatched rather than grow the table
# without bound (a queue's task lives as long as the replica).
MAX_QUEUES = 64


@dataclass(frozen=True)
class Scaling:
    """How the translation deployment runs: replicas (fixed, or autoscaled between min and max), its batch and the
    wait that fills it, the requests queued before a 503, and what each replica reserves."""

    min_replicas: int = 1
    max_replicas: int = 1
    max_batch_size: int = 4
    batch_wait_s: float = 0.01
    max_queued: int = 64
    cpus: float = 1.0
    gpus: float = 0.0

    def options(self) -> dict[str, Any]:
        """The deployment's Ray Serve options."""
        replicas: dict[str, Any] = (
            {"num_replicas": self.min_replicas} if self.min_replicas == self.max_replicas else
            {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                    "target_ongoing_requests": self.max_batch_size}})
        return {**replicas, "max_ongoing_requests": 4 * self.max_batch_size, "max_queued_requests": self.max_queued,
                "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus}}


StepSink = Callable[[Step], None]
Item = tuple[Job, float, StepSink | None]  # a job, when it arrived, where its steps go (None: nowhere)
Batch = Callable[[list[Item]], Awaitable[list[Translated]]]
Batcher = Callable[[int, float], Callable[[Batch], Callable[[Item], Awaitable[Translated]]]]


def serve_batch(max_batch_size: int, batch_wait_s: float) -> Any:
    """Ray Serve's dynamic batching (`serve.batch`, inside a replica only)."""
    from ray import serve

    return serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)


class TranslationReplica:
    """One replica: a Translator opened once, and a batch queue per run size and request options, so that images
    of another size never wait behind a batch they cannot join."""

    def __init__(self, cfg: RunConfig, max_batch_size: int, batch_wait_s: float,
                 batcher: Batcher | None = None) -> None:
        self.translator = Translator.from_config(cfg, log=lambda s: None)
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.batcher = batcher or serve_batch
        self.queues: dict[tuple[Any, ...], Callable[[Item], Awaitable[Translated]]] = {}

    async def translate(self, job: Job) -> Translated:
        """One image's answer."""
        return await self._submit(job, None)

    async def translate_events(self, job: Job) -> AsyncIterator[Step | Translated]:
        """One image's denoising steps as its batch runs them (where the backend reports steps), then its answer:
        what the page's progress bar follows (a streaming call through Ray Serve)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Step | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._submit(job, lambda s: loop.call_soon_threadsafe(events.put_nowait, s)))
        # the steps were queued from the worker thread before its result: they come out first
        task.add_done_callback(lambda _: events.put_nowait(None))
        while (event := await events.get()) is not None:
            yield event
        yield await task

    async def _submit(self, job: Job, steps: StepSink | None) -> Translated:
        arrived = time.perf_counter()
        if job.prompt:  # a prompt the model cannot take is this request's 422, not its batch's failure
            try:
                self.translator.runtime.check_prompts([job.prompt])
            except R2RError as exc:
                raise RequestError(422, f"prompt: {exc}") from None
        h, w = job.image.shape[:2]
        key = (self.translator.run_size(w, h, job.fit, job.max_pixels), job.method, job.fit, job.max_pixels)
        queue = self.queues.get(key)
        if queue is None and len(self.queues) < MAX_QUEUES:
            queue = self.queues[key] = self.batcher(self.max_batch_size, self.batch_wait_s)(self._batch)
        if queue is None:
            return (await self._batch([(job, arrived, steps)]))[0]
        return await queue((job, arrived, steps))

    async def _batch(self, items: list[Item]) -> list[Translated]:
        """One batch of one key, run off the event loop (the Translator serialises its own calls)."""
        start = time.perf_counter()
        jobs = [job for job, _, _ in items]
        sinks = [sink for _, _, sink in items if sink is not None]
        first = jobs[0]

        def progress(event: Progress) -> None:  # on the worker thread; each sink hands the step to its loop
            if event.kind == "step":
                for sink in sinks:
                    sink(Step(event.done, event.total))

        def work() -> tuple[list[bytes], dict[str, Any]]:  # PNG encoding too: none of it on the event loop
            out = self.translator.translate([j.image for j in jobs], progress if sinks else None, first.method,
                                            first.fit, first.max_pixels, [j.prompt for j in jobs])
            pngs = [png_bytes(np.asarray(img), output_text(params_with_prompt(out.params, j.prompt), j.name))
                    for j, img in zip(jobs, out, strict=True)]
            return pngs, out.params

        pngs, params = await asyncio.to_thread(work)
        run_s = time.perf_counter() - start
        return [Translated(png, params_with_prompt(params, job.prompt), start - arrived, run_s, len(jobs))
                for (job, arrived, _), png in zip(items, pngs, strict=True)]

    def ready(self) -> dict[str, Any]:
        return {"backend": self.translator.describe(), "params": self.translator.params,
                "max_batch_size": self.max_batch_size}


class RayService:
    """The ingress's `Service` on a deployment handle: Ray's overload and lost-replica errors become `Overloaded`
    (a 503 with Retry-After), so that a client retries instead of reading a 500."""

    def __init__(self, handle: Any) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        self.handle = handle
        self.full = (BackPressureError,)
        self.lost = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)

    async def translate(self, job: Job) -> Translated:
        try:
            return await self.handle.translate.remote(job)
        except self.full:
            raise Overloaded("the queue is full; try again") from None
        except self.lost:
            raise Overloaded("the replica serving this request was lost; try again") from None

    async def translate_events(self, job: Job) -> AsyncIterator[Step | Translated]:
        try:
            async for event in self.handle.options(stream=True).translate_events.remote(job):
                yield event
        except self.full:
            raise Overloaded("the queue is full; try again") from None
        except self.lost:
            raise Overloaded("the replica serving this request was lost; try again") from None

    async def ready(self) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.handle.ready.remote(), timeout=5.0)
        except (TimeoutError, *self.full, *self.lost):
            return None


class Ingress:
    """The ingress deployment: the one FastAPI app, built on its replica around the translation handle."""

    def __init__(self, translation: Any, settings: ServeSettings) -> None:
        self.asgi = build_app(settings, RayService(translation))

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi


def application(cfg: RunConfig, settings: ServeSettings, scaling: Scaling) -> Any:
    """The Ray Serve application: the ingress bound to the translation deployment. `cfg`: a run already prepared
    and pinned (`PreparedRun.config`), so that no replica exports, builds or tries anything."""
    from ray import serve

    translation = serve.deployment(TranslationReplica, name="Translation").options(**scaling.options())
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress").options(
        num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    return ingress.bind(translation.bind(cfg, scaling.max_batch_size, scaling.batch_wait_s), settings)


__all__ = ["MAX_QUEUES", "Ingress", "RayService", "Scaling", "TranslationReplica", "application"]
