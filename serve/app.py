"""The one FastAPI app of `r2r-serve` (its ingress): `/v1/translate` (and its event stream), A1111's
`/sdapi/v1/img2img`, `/healthz`, `/readyz`, `/metrics` and the page at `/`. It reads and checks every request (size,
image, fields, token) before any work and hands each image to a `Service` (on Ray Serve: the translation
deployment); a bad request is a 4xx naming the problem, overload a 503 with Retry-After, never a 500. Why:
docs/serving.md."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from r2r.config import Method
from r2r.serve.metrics import Metrics
from r2r.serve.requests import (
    IMAGE_TYPES,
    Job,
    RequestError,
    Step,
    Translated,
    parse_a1111,
    parse_fields,
    read_image,
)

MiB = 1 << 20
# The page: files of this package, served as they are (nothing from another host: no CDN, no web font).
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}
# The page loads nothing from elsewhere; it shows (and reads back, to download) its results as blob: URLs.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:"
# What a browser may load without the token (the page asks for one when the service wants it) and what a probe may.
OPEN_PATHS = ("/healthz", "/readyz", *PAGE_FILES)


@dataclass(frozen=True)
class ServeSettings:
    """What the ingress enforces; the command's flags."""

    method: Method = field(default_factory=Method)  # the server's method; a request's fields change a copy
    max_body_bytes: int = 32 * MiB  # a larger body is a 413, refused before it is read whole
    max_input_pixels: int = 4096 * 4096  # a larger image is a 400, refused from its header
    max_images: int = 16  # per A1111 request (batch_size x n_iter)
    max_batch_size: int = 4  # the replicas' batch (the batch-size histogram's buckets)
    auth_token: str | None = None  # a bearer token every translation request must carry
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    retry_after_s: int = 2  # what a 503 tells a client to wait


class Overloaded(Exception):
    """The service cannot take the request now (its queue is full, or the replica serving it was lost)."""


class Service(Protocol):
    """Where the ingress sends images: one call per image (the service batches them)."""

    async def translate(self, job: Job) -> Translated: ...

    def translate_events(self, job: Job) -> AsyncIterator[Step | Translated]:
        """The image's denoising steps, then its answer."""
        ...

    async def ready(self) -> dict[str, Any] | None: ...


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(settings: ServeSettings, service: Service) -> FastAPI:
    """The ingress: every route, with the checks every request passes first."""
    app = FastAPI(title="r2r-serve", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    metrics = Metrics(settings.max_batch_size)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await _guarded(request, call_next)
        metrics.answered(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    async def _guarded(request: Request, call_next: Any) -> Response:
        # the token first (a stranger learns nothing of the limits), then the body's declared size
        if settings.auth_token is not None and request.url.path not in OPEN_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            want = f"Bearer {settings.auth_token}"
            if not hmac.compare_digest(given.encode(), want.encode()):
                return error(401, "a bearer token is required (Authorization: Bearer <token>)",
                             {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error(413, f"the body is over {settings.max_body_bytes} bytes")
        return await call_next(request)

    async def translated(job: Job) -> Translated:
        metrics.queued.inc()
        try:
            out = await service.translate(job)
        finally:
            metrics.queued.dec()
        metrics.translated(out.batch)
        return out

    async def translated_events(job: Job) -> AsyncIterator[Step | Translated]:
        """`translated`, as the image's steps then its answer."""
        metrics.queued.inc()
        try:
            async for event in service.translate_events(job):
                if isinstance(event, Translated):
                    metrics.translated(event.batch)
                yield event
        finally:
            metrics.queued.dec()

    async def request_job(request: Request) -> Job:
        """The image and fields of a translate request, checked."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields = dict(request.query_params)
        if kind == "multipart/form-data":
            data, name, form_fields = await _multipart(request, settings.max_body_bytes)
            clash = sorted(set(fields) & set(form_fields))
            if clash:
                raise RequestError(422, f"{', '.join(clash)}: given both as a query and a form field")
            fields |= form_fields
        elif kind in IMAGE_TYPES:
            data, name = await _body(request, settings.max_body_bytes), "the request body"
        else:
            raise RequestError(415 if kind else 400, f"content type {kind or '(none)'}: send the image as "
                               f"{', '.join(IMAGE_TYPES)} or as a multipart file")
        method, fit, max_pixels, prompt = parse_fields(fields, settings.method)
        return Job(read_image(data, name, settings.max_input_pixels), name, method, fit, max_pixels, prompt=prompt)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error(503, str(exc) or "overloaded; try again", {"Retry-After": str(settings.retry_after_s)})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            info = await service.ready()
        except Overloaded:
            info = None
        if info is None:
            return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"ready": True, **info})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/")
    @app.get("/page.js")
    @app.get("/page.css")
    async def page(request: Request) -> Response:
        name, kind = PAGE_FILES[request.url.path]
        return Response(resources.files("r2r.serve").joinpath("page", name).read_bytes(), media_type=kind,
                        headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @app.post("/v1/translate")
    async def translate(request: Request) -> Response:
        out = await translated(await request_job(request))
        return Response(out.png, media_type="image/png", headers=_timing(out))

    @app.post("/v1/translate/events")
    async def translate_events(request: Request) -> StreamingResponse:
        """The same request as /v1/translate, answered as server-sent events: `step` ({done, total}) as the image's
        batch runs, then `done` (the PNG in base64, its parameters and timings) or `error` ({error, status})."""
        events = translated_events(await request_job(request))
        try:
            first = await anext(events)  # a full queue is still a 503 here, before the stream starts
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(_sse(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        req = parse_a1111(await _body(request, settings.max_body_bytes), settings.method, settings.max_images)
        images = [read_image(data, f"init_images[{i}]", settings.max_input_pixels) for i, data in
                  enumerate(req.images)]
        # A1111 fills batch_size x n_iter images from its init images in turn; this method is deterministic, so
        # each distinct init image is translated once and repeated
        used = sorted({k % len(images) for k in range(req.count)})
        outs = await asyncio.gather(*(translated(Job(images[i], f"init_images[{i}]", req.method, prompt=req.prompt))
                                      for i in used))
        by_index = dict(zip(used, outs, strict=True))
        results = [by_index[k % len(images)] for k in range(req.count)]
        params = results[0].params
        info = {"r2r": params, "ignored": req.ignored, "images": req.count,
                "note": "fields this method has no use for are ignored; the result does not depend on them"}
        return JSONResponse({"images": [base64.b64encode(r.png).decode() for r in results],
                             "parameters": req.parameters, "info": json.dumps(info)},
                            headers=_timing(results[0]))

    return app


async def _sse(first: Step | Translated, rest: AsyncIterator[Step | Translated]) -> AsyncIterator[bytes]:
    """Server-sent events of one image; an error after the stream started is an `error` event (its status is
    already sent)."""
    def event(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    try:
        item: Step | Translated | None = first
        while item is not None:
            if isinstance(item, Step):
                yield event("step", {"done": item.done, "total": item.total})
            else:
                yield event("done", {"png": base64.b64encode(item.png).decode(), "params": item.params,
                                     "queue_s": round(item.queue_s, 4), "run_s": round(item.run_s, 4),
                                     "batch": item.batch})
            item = await anext(rest, None)
    except (Overloaded, RequestError) as exc:
        status = exc.status if isinstance(exc, RequestError) else 503
        yield event("error", {"error": str(exc) or "overloaded; try again", "status": status})
    finally:
        await rest.aclose()  # a client gone mid-stream: the image's count in flight ends with it


def _timing(out: Translated) -> dict[str, str]:
    return {"X-R2R-Queue-Seconds": f"{out.queue_s:.4f}", "X-R2R-Run-Seconds": f"{out.run_s:.4f}",
            "X-R2R-Batch": str(out.batch)}


async def _body(request: Request, limit: int) -> bytes:
    """The body, read in chunks and refused as soon as it passes `limit` (a chunked upload declares no length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart(request: Request, limit: int) -> tuple[bytes, str, dict[str, str]]:
    """A multipart form: its one file (the image) and its other fields, as strings."""
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=limit)
    except Exception as exc:  # Starlette's MultiPartException and the parser's errors: a malformed form
        raise RequestError(400, f"malformed multipart form ({exc})") from None
    files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
    if len(files) != 1:
        raise RequestError(422, f"a multipart request carries one image file, got {len(files)}")
    _, upload = files[0]
    data = await upload.read()
    name = upload.filename or "the uploaded file"
    return data, name, {k: v for k, v in form.multi_items() if isinstance(v, str)}


__all__ = ["Overloaded", "ServeSettings", "Service", "build_app"]
