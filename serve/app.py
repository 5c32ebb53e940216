"""The one FastAPI app of `r2r-serve` (its ingress): `/v1/translate`, A1111's `/sdapi/v1/img2img`, `/healthz`,
`/readyz`. It reads and checks every request (size, image, fields, token) before any work and hands each image to
a `Service` (on Ray Serve: the translation deployment); a bad request is a 4xx naming the problem, overload a 503
with Retry-After, never a 500. Why: docs/serving.md."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from r2r.config import Method
from r2r.serve.requests import (
    IMAGE_TYPES,
    Job,
    RequestError,
    Translated,
    parse_a1111,
    parse_fields,
    read_image,
)

MiB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """What the ingress enforces; the command's flags."""

    method: Method = field(default_factory=Method)  # the server's method; a request's fields change a copy
    max_body_bytes: int = 32 * MiB  # a larger body is a 413, refused before it is read whole
    max_input_pixels: int = 4096 * 4096  # a larger image is a 400, refused from its header
    max_images: int = 16  # per A1111 request (batch_size x n_iter)
    auth_token: str | None = None  # a bearer token every translation request must carry
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    retry_after_s: int = 2  # what a 503 tells a client to wait


class Overloaded(Exception):
    """The service cannot take the request now (its queue is full, or the replica serving it was lost)."""


class Service(Protocol):
    """Where the ingress sends images: one call per image (the service batches them)."""

    async def translate(self, job: Job) -> Translated: ...

    async def ready(self) -> dict[str, Any] | None: ...


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(settings: ServeSettings, service: Service) -> FastAPI:
    """The ingress: every route, with the checks every request passes first."""
    app = FastAPI(title="r2r-serve", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    open_paths = ("/healthz", "/readyz")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        # the token first (a stranger learns nothing of the limits), then the body's declared size
        if settings.auth_token is not None and request.url.path not in open_paths and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            want = f"Bearer {settings.auth_token}"
            if not hmac.compare_digest(given.encode(), want.encode()):
                return error(401, "a bearer token is required (Authorization: Bearer <token>)",
                             {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error(413, f"the body is over {settings.max_body_bytes} bytes")
        return await call_next(request)

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

    @app.post("/v1/translate")
    async def translate(request: Request) -> Response:
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
        method, fit, max_pixels = parse_fields(fields, settings.method)
        image = read_image(data, name, settings.max_input_pixels)
        out = await service.translate(Job(image, name, method, fit, max_pixels))
        return Response(out.png, media_type="image/png", headers=_timing(out))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        req = parse_a1111(await _body(request, settings.max_body_bytes), settings.method, settings.max_images)
        images = [read_image(data, f"init_images[{i}]", settings.max_input_pixels) for i, data in
                  enumerate(req.images)]
        # A1111 fills batch_size x n_iter images from its init images in turn; this method is deterministic, so
        # each distinct init image is translated once and repeated
        used = sorted({k % len(images) for k in range(req.count)})
        outs = await asyncio.gather(*(service.translate(Job(images[i], f"init_images[{i}]", req.method))
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
