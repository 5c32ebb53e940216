"""r2r-serve's ingress app and translation replica, in one process (the replica called as the ingress calls it
through Ray): answers equal r2r-run's, bad requests get their 4xx, auth."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r.config import Method
from r2r.imageio import decode_rgb, load_rgb
from r2r.runtime.outputs import PARAMS_KEY
from r2r.runtime.translator import run_config
from r2r.serve.app import ServeSettings, build_app
from r2r.serve.deployment import TranslationReplica
from r2r.serve.requests import Job, Translated
from r2r.source import ModelSource

METHOD = Method(steps=4, strength=0.5)
SIZES = [(256, 256), (200, 150)]


class NoTranslation:
    """A Service that must not be reached (a refused request never gets to translation)."""

    def __init__(self, ready: dict[str, Any] | None = None) -> None:
        self.info = ready

    async def translate(self, job: Job) -> Translated:
        raise AssertionError("a refused request reached the service")

    async def ready(self) -> dict[str, Any] | None:
        return self.info


class InProcess:
    """The ingress's Service on a replica in this process."""

    def __init__(self, replica: TranslationReplica) -> None:
        self.replica = replica

    async def translate(self, job: Job) -> Translated:
        return await self.replica.translate(job)

    async def ready(self) -> dict[str, Any] | None:
        return self.replica.ready()


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from r2r.training.data import render_pair, sample_design

    folder = tmp_path_factory.mktemp("serve") / "in"
    folder.mkdir()
    paths = []
    for i, (w, h) in enumerate(SIZES):
        paths.append(folder / f"render{i}.png")
        Image.fromarray(render_pair(sample_design(np.random.default_rng([47, i]), (w, h)), (w, h))[0]).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def replica(embedded_bundle: Path) -> TranslationReplica:
    cfg = run_config(ModelSource.of(None, (), None, None), embedded_bundle, "onnxruntime", None, "auto", 2, 0, "pad",
                     None, METHOD, "exact", "auto", None, None)
    return TranslationReplica(cfg, max_batch_size=2, batch_wait_s=0.05, batcher=one_at_a_time)


def one_at_a_time(max_batch_size: int, batch_wait_s: float):
    """`serve.batch`'s stand-in outside a Ray Serve replica: each request a batch of one."""

    def wrap(run):
        async def call(item):
            return (await run([item]))[0]

        return call

    return wrap


def _call(app: Any, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return list(await asyncio.gather(*(client.request(**r) for r in requests)))

    return asyncio.run(go())


def _png_params(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text[PARAMS_KEY])


def test_translate_answers_r2r_runs_image_and_parameters(replica, renders: list[Path], embedded_bundle: Path,
                                                         tmp_path: Path) -> None:
    from r2r.runtime.cli import main

    res = CliRunner().invoke(main, ["--engine", str(embedded_bundle), "--backend", "onnxruntime", "--input",
                                    str(renders[0].parent), "--output", str(tmp_path / "cli"), "--steps", "4",
                                    "--strength", "0.5"])
    assert res.exit_code == 0, res.output
    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    for p in renders:  # one at a time: batches of one, as r2r-run's --batch-size 1
        (r,) = _call(app, [{"method": "POST", "url": "/v1/translate", "content": p.read_bytes(),
                            "headers": {"content-type": "image/png"}}])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        expected = tmp_path / "cli" / p.name
        assert np.array_equal(decode_rgb(r.content, 'answer'),
                              load_rgb(expected)), p.name
        got, want = _png_params(r.content), _png_params(expected.read_bytes())
        assert {k: v for k, v in got.items() if k != "source"} == {k: v for k, v in want.items() if k != "source"}
        assert float(r.headers["x-r2r-run-seconds"]) > 0 and r.headers["x-r2r-batch"] == "1"


def test_concurrent_requests_of_two_sizes_each_get_their_own_image(replica, renders: list[Path],
                                                                    tmp_path: Path) -> None:
    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    alone = [decode_rgb(_call(app, [{"method": "POST", "url": "/v1/translate", "content": p.read_bytes(),
                                     "headers": {"content-type": "image/png"}}])[0].content, "alone")
             for p in renders]
    order = [0, 1, 0, 1, 0, 1]
    answers = _call(app, [{"method": "POST", "url": "/v1/translate", "content": renders[i].read_bytes(),
                           "headers": {"content-type": "image/png"}} for i in order])
    assert [r.status_code for r in answers] == [200] * len(order)
    for i, r in zip(order, answers, strict=True):
        got = decode_rgb(r.content, 'answer').astype(int)
        assert got.shape == alone[i].shape
        assert np.abs(got - alone[i]).max() <= 2  # fp32 across batch sizes


def test_a1111_img2img_answers_in_its_shape_and_reports_what_it_ignored(replica, renders: list[Path],
                                                                        tmp_path: Path) -> None:
    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    body = {"init_images": [base64.b64encode(renders[0].read_bytes()).decode()], "denoising_strength": 0.5,
            "steps": 4, "cfg_scale": 7.5, "batch_size": 2, "prompt": "a photo", "seed": 3, "sampler_name": "Euler"}
    direct, r = _call(app, [{"method": "POST", "url": "/v1/translate?steps=4&strength=0.5&guidance=7.5",
                             "content": renders[0].read_bytes(), "headers": {"content-type": "image/png"}},
                            {"method": "POST", "url": "/sdapi/v1/img2img", "json": body}])
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 2 and info["ignored"] == ["prompt", "sampler_name", "seed"]
    assert info["r2r"]["steps"] == 4 and info["r2r"]["strength"] == 0.5 and out["parameters"]["seed"] == 3
    want = decode_rgb(direct.content, 'answer')
    for b64 in out["images"]:
        assert np.array_equal(decode_rgb(base64.b64decode(b64), 'answer'), want)


def _corrupt_crc(png: bytes) -> bytes:
    data = bytearray(png)
    idat = data.find(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of the chunk's data: its CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize(("case", "status", "words"), [
    ("not an image", 400, "cannot read image"),
    ("empty", 400, "empty"),
    ("truncated", 400, "cannot read image"),
    ("bad crc", 400, "cannot read image"),
    ("too large", 413, "over"),
    ("text body", 415, "content type text/plain"),
    ("unknown field", 422, "unknown field prompt"),
    ("steps out of range", 422, "steps must be in [1, 1000]"),
    ("strength not finite", 422, "strength: a finite number"),
    ("bad fit", 422, "fit: one of"),
    ("a1111 not json", 400, "not JSON"),
    ("a1111 no images", 422, "init_images"),
])
def test_a_bad_request_gets_its_status_and_names_the_problem(renders: list[Path], case: str, status: int,
                                                             words: str) -> None:
    png = renders[0].read_bytes()
    app = build_app(ServeSettings(max_body_bytes=len(png) + 10), NoTranslation())
    post = {"method": "POST", "url": "/v1/translate", "headers": {"content-type": "image/png"}}
    req = {
        "not an image": {**post, "content": b"hello, not a picture"},
        "empty": {**post, "content": b""},
        "truncated": {**post, "content": png[: len(png) // 2]},
        "bad crc": {**post, "content": _corrupt_crc(png)},
        "too large": {**post, "content": png + b"\0" * 64},
        "text body": {**post, "content": b"x", "headers": {"content-type": "text/plain"}},
        "unknown field": {**post, "url": "/v1/translate?prompt=red", "content": png},
        "steps out of range": {**post, "url": "/v1/translate?steps=0", "content": png},
        "strength not finite": {**post, "url": "/v1/translate?strength=nan", "content": png},
        "bad fit": {**post, "url": "/v1/translate?fit=zoom", "content": png},
        "a1111 not json": {"method": "POST", "url": "/sdapi/v1/img2img", "content": b"{"},
        "a1111 no images": {"method": "POST", "url": "/sdapi/v1/img2img", "json": {"steps": 4}},
    }[case]
    (r,) = _call(app, [req])
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()


def test_a_token_is_required_where_one_is_set_and_health_stays_open(renders: list[Path]) -> None:
    app = build_app(ServeSettings(auth_token="s3cret-token-0123456789"), NoTranslation({"backend": "test"}))
    post = {"method": "POST", "url": "/v1/translate?prompt=x", "content": renders[0].read_bytes()}
    none, wrong, right, health, ready = _call(app, [
        {**post, "headers": {"content-type": "image/png"}},
        {**post, "headers": {"content-type": "image/png", "authorization": "Bearer s3cret-token-0123456780"}},
        {**post, "headers": {"content-type": "image/png", "authorization": "Bearer s3cret-token-0123456789"}},
        {"method": "GET", "url": "/healthz"},
        {"method": "GET", "url": "/readyz"},
    ])
    assert none.status_code == 401 and wrong.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 422  # past the token: the unknown field is the next refusal
    assert health.status_code == 200 and ready.status_code == 200 and ready.json()["backend"] == "test"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_r2r_serve_answers_on_ray_serve_and_sigterm_leaves_no_ray_process(embedded_bundle: Path, renders: list[Path],
                                                                         replica) -> None:
    """The command itself: Ray Serve on a free port of 127.0.0.1, one request, then SIGTERM: exit 0, nothing left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "r2r.serve.cli", "--engine", str(embedded_bundle), "--backend", "onnxruntime",
           "--steps", "4", "--strength", "0.5", "--port", str(port), "--max-batch-size", "2", "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(lines[-20:])
            lines.append(line)
            if "ready at" in line:
                break
        assert f"ready at http://127.0.0.1:{port}/" in "".join(lines), "".join(lines[-20:])
        family = psutil.Process(proc.pid).children(recursive=True)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/translate", content=renders[0].read_bytes(),
                       headers={"content-type": "image/png"}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        job = Job(load_rgb(renders[0]), "x")
        want = asyncio.run(replica.translate(job))
        with Image.open(io.BytesIO(r.content)) as a, Image.open(io.BytesIO(want.png)) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(family, timeout=30)
        assert alive == [], [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
