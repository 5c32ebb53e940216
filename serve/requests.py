"""What a request may ask of `r2r-serve`, read and checked before any work: an image, the method's fields, A1111's
img2img shape. Each refusal is a `RequestError` with its HTTP status and a message naming the field or the problem.
Why: docs/serving.md, "Limits"."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from r2r.config import Method
from r2r.errors import R2RError
from r2r.imageio import ImageReadError, decode_rgb
from r2r.prompts import MAX_PROMPT_CHARS
from r2r.sizing import FITS

# The fields a request may set: the method's per-image values and how the input is sized. The TAC divisor and
# target are the bundle's (its graphs were exported for them); they are not a request's to change.
METHOD_FIELDS = ("steps", "strength", "guidance", "tac_ratio", "text_guidance")
RUN_FIELDS = ("fit", "max_pixels")
PROMPT_FIELD = "prompt"  # the image's prompt, at text_guidance (docs/design.md, "Prompts")
FIELDS = (*METHOD_FIELDS, *RUN_FIELDS, PROMPT_FIELD)
_INTS = ("steps", "max_pixels")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")

# A1111's img2img fields r2r maps, and the ones it accepts and reports as ignored (this method has no negative
# prompt, seed or sampler to choose: its negative is the bundle's embedding, its inversion is deterministic). The
# prompt is used where the method's text guidance is > 0 (the server's, or the request's `text_guidance`).
A1111_MAPPED = {"denoising_strength": "strength", "steps": "steps", "cfg_scale": "guidance",
                "text_guidance": "text_guidance"}
A1111_COUNTS = ("batch_size", "n_iter")


class RequestError(R2RError, ValueError):
    """A request refused: `status` (400 bad image, 413 too large, 422 bad field) and a message naming why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Job:
    """One image to translate, with what its request asked (None: the server's)."""

    image: np.ndarray
    name: str
    method: Method | None = None
    fit: str | None = None
    max_pixels: int | None = None
    request_id: str = ""
    prompt: str | None = None


@dataclass(frozen=True)
class Step:
    """A denoising step of the batch an image is in: `done` of `total` (what the page's progress bar shows)."""

    done: int
    total: int


@dataclass(frozen=True)
class Translated:
    """One image's answer: the PNG (with r2r-run's text inside), what made it, and where its time went."""

    png: bytes
    params: dict[str, Any]
    queue_s: float = 0.0
    run_s: float = 0.0
    batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def parse_fields(given: Mapping[str, str], server: Method
                 ) -> tuple[Method | None, str | None, int | None, str | None]:
    """A request's fields (query or form, as strings) -> (method, fit, max_pixels, prompt); None where not given. An
    unknown field, a value of the wrong type or out of range is a 422 naming it."""
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    values: dict[str, Any] = {}
    for name, raw in given.items():
        if name == PROMPT_FIELD:
            continue
        try:
            values[name] = raw if name == "fit" else int(raw) if name in _INTS else float(raw)
        except (TypeError, ValueError):
            kind = "an integer" if name in _INTS else "a number"
            raise RequestError(422, f"{name}: {kind}, got {str(raw)[:40]!r}") from None
    if "fit" in values and values["fit"] not in FITS:
        raise RequestError(422, f"fit: one of {', '.join(FITS)}, got {str(values['fit'])[:40]!r}")
    if "max_pixels" in values and values["max_pixels"] < 4096:
        raise RequestError(422, f"max_pixels: at least 4096, got {values['max_pixels']}")
    return method_of({k: v for k, v in values.items() if k in METHOD_FIELDS}, server), values.get("fit"), \
        values.get("max_pixels"), prompt_of(given.get(PROMPT_FIELD))


def prompt_of(value: Any, field_name: str = PROMPT_FIELD) -> str | None:
    """A request's prompt: text of at most MAX_PROMPT_CHARS (None or "": none), else a 422 naming the field."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS or "\x00" in value:
        raise RequestError(422, f"{field_name}: text of at most {MAX_PROMPT_CHARS} characters")
    return value


def method_of(values: Mapping[str, Any], server: Method) -> Method | None:
    """The server's method with a request's values (None where the request gave none), checked in one place
    (`Method`), a bad value a 422 naming the field."""
    if not values:
        return None
    if any(isinstance(v, float) and not np.isfinite(v) for v in values.values()):
        raise RequestError(422, f"{', '.join(k for k, v in values.items() if not np.isfinite(v))}: a finite number")
    try:
        return replace(server, **values)
    except (TypeError, ValueError) as exc:
        raise RequestError(422, str(exc)) from None


def read_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """A request's image bytes -> uint8 RGB; not an image, truncated or corrupt (a PNG chunk's CRC) is a 400."""
    if not data:
        raise RequestError(400, f"{name}: empty; send a PNG, JPEG or WebP image")
    try:
        return decode_rgb(data, name, max_pixels)
    except ImageReadError as exc:  # Pillow names an in-memory file by its repr: no use to a client
        raise RequestError(400, re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))) from None


@dataclass(frozen=True)
class A1111Request:
    """An `/sdapi/v1/img2img` body, read: its images (each repeated batch_size x n_iter times, as A1111 fills a
    batch from its init images), the method, and the fields accepted but ignored."""

    images: list[bytes]
    method: Method | None
    count: int
    ignored: list[str]
    parameters: dict[str, Any]
    prompt: str | None = None  # used where the method's text guidance is > 0


def parse_a1111(body: bytes, server: Method, max_images: int) -> A1111Request:
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc})") from None
    if not isinstance(req, dict):
        raise RequestError(422, "the body is a JSON object with init_images")
    init = req.get("init_images")
    if not isinstance(init, list) or not init or not all(isinstance(x, str) for x in init):
        raise RequestError(422, "init_images: a non-empty list of base64 images")
    images = []
    for i, text in enumerate(init):
        payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            images.append(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"init_images[{i}]: not base64") from None
    counts = {}
    for name in A1111_COUNTS:
        v = req.get(name, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RequestError(422, f"{name}: a positive integer, got {str(v)[:40]!r}")
        counts[name] = v
    count = counts["batch_size"] * counts["n_iter"]
    if count * len(images) > max_images or count > max_images:
        raise RequestError(422, f"batch_size x n_iter = {count}: at most {max_images} images per request here")
    values: dict[str, Any] = {}
    for a1111, ours in A1111_MAPPED.items():
        if a1111 in req and req[a1111] is not None:
            v = req[a1111]
            if isinstance(v, bool) or not isinstance(v, int | float) or (ours == "steps" and not isinstance(v, int)):
                raise RequestError(422, f"{a1111}: {'an integer' if ours == 'steps' else 'a number'}, got "
                                        f"{str(v)[:40]!r}")
            values[ours] = v
    try:
        method = method_of(values, server)
    except RequestError as exc:
        raise RequestError(422, f"{exc.message} (A1111 fields: denoising_strength -> strength, cfg_scale -> "
                                "guidance)") from None
    prompt = prompt_of(req.get("prompt"), "prompt")
    guided = (method or server).text_guidance > 0
    ignored = sorted(k for k in req if k not in ("init_images", *A1111_MAPPED, *A1111_COUNTS)
                     and not (k == "prompt" and guided))
    parameters = {k: v for k, v in req.items() if k != "init_images"} | {"init_images": None}
    return A1111Request(images, method, count, ignored, parameters, prompt if guided else None)


__all__ = [
    "FIELDS",
    "IMAGE_TYPES",
    "METHOD_FIELDS",
    "A1111Request",
    "Job",
    "RequestError",
    "Step",
    "Translated",
    "method_of",
    "parse_a1111",
    "parse_fields",
    "prompt_of",
    "read_image",
]
