"""r2r-serve's ingress app and translation replica, in one process (the replica called as the ingress calls it
through Ray): answers equal r2r-run's, bad requests get their 4xx, auth."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r.benchmarks.serving import Server, free_port
from r2r.config import Method
from r2r.imageio import decode_rgb, load_rgb, png_bytes
from r2r.runtime.outputs import PARAMS_KEY
from r2r.runtime.translator import run_config
from r2r.serve.app import ServeSettings, build_app
from r2r.serve.deployment import TranslationReplica
from r2r.serve.requests import Job, Step, Translated
from r2r.source import ModelSource

METHOD = Method(steps=4, strength=0.5)
SIZES = [(256, 256), (200, 150)]


class NoTranslation:
    """A Service that must not be reached (a refused request never gets to translation)."""

    def __init__(self, ready: dict[str, Any] | None = None) -> None:
        self.info = ready

    async def translate(self, job: Job) -> Translated:
        raise AssertionError("a refused request reached the service")

    async def translate_events(self, job: Job) -> AsyncIterator[Step | Translated]:
        raise AssertionError("a refused request reached the service")
        yield  # an async generator

    async def ready(self) -> dict[str, Any] | None:
        return self.info


class InProcess:
    """The ingress's Service on a replica in this process."""

    def __init__(self, replica: TranslationReplica) -> None:
        self.replica = replica

    async def translate(self, job: Job) -> Translated:
        return await self.replica.translate(job)

    def translate_events(self, job: Job) -> AsyncIterator[Step | Translated]:
        return self.replica.translate_events(job)

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


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events: (event, data) per block."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_the_event_stream_reports_every_step_then_the_same_image(replica, renders: list[Path]) -> None:
    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    post = {"method": "POST", "content": renders[1].read_bytes(), "headers": {"content-type": "image/png"}}
    plain, streamed = _call(app, [{**post, "url": "/v1/translate"}, {**post, "url": "/v1/translate/events"}])
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _sse(streamed.text)
    steps = [data for kind, data in events if kind == "step"]
    total = steps[0]["total"]
    # the exact program: METHOD's inversion steps then its generation steps, each reported once, in order
    assert total == 2 * int(METHOD.steps * METHOD.strength) and [s["done"] for s in steps] == list(range(1, total + 1))
    (kind, done), = events[len(steps):]
    assert kind == "done" and done["params"] == {k: v for k, v in _png_params(plain.content).items() if k != "source"}
    assert np.array_equal(decode_rgb(base64.b64decode(done["png"]), "event"), decode_rgb(plain.content, "answer"))


def test_metrics_count_requests_by_status_latency_images_and_batches(replica, renders: list[Path]) -> None:
    app = build_app(ServeSettings(method=replica.translator.runtime.method, max_batch_size=2), InProcess(replica))
    post = {"method": "POST", "url": "/v1/translate", "headers": {"content-type": "image/png"}}
    ok, bad = _call(app, [{**post, "content": renders[0].read_bytes()},
                          {**post, "url": "/v1/translate?steps=0", "content": renders[0].read_bytes()}])
    assert (ok.status_code, bad.status_code) == (200, 422)
    (m,) = _call(app, [{"method": "GET", "url": "/metrics"}])
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    lines = set(m.text.splitlines())
    for want in ('r2r_requests_total{route="/v1/translate",status="200"} 1.0',
                 'r2r_requests_total{route="/v1/translate",status="422"} 1.0',
                 'r2r_request_seconds_count{route="/v1/translate"} 2.0',
                 'r2r_batch_size_bucket{le="1.0"} 1.0', 'r2r_batch_size_count 1.0',
                 "r2r_images_total 1.0", "r2r_images_in_flight 0.0"):
        assert want in lines, want
    rate = next(x for x in lines if x.startswith("r2r_images_per_second "))
    assert float(rate.split()[1]) > 0


def _corrupt_crc(png: bytes) -> bytes:
    data = bytearray(png)
    idat = data.find(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of the chunk's data: its CRC no longer matches
    return bytes(data)


def test_a_requests_prompt_guides_its_own_image_and_one_the_model_cannot_take_is_refused(
        replica, renders: list[Path]) -> None:
    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    png = renders[0].read_bytes()
    post = {"method": "POST", "headers": {"content-type": "image/png"}, "content": png}
    body = {"init_images": [base64.b64encode(png).decode()], "denoising_strength": 0.5, "steps": 4,
            "prompt": "a red silk dress", "text_guidance": 3.0}
    guided, plain, bad, a1111 = _call(app, [
        {**post, "url": "/v1/translate?text_guidance=3&prompt=a%20red%20silk%20dress"},
        {**post, "url": "/v1/translate"},
        {**post, "url": "/v1/translate?text_guidance=3&prompt=a%20%3Crendered%3E%20dress"},
        {"method": "POST", "url": "/sdapi/v1/img2img", "json": body}])
    assert guided.status_code == 200 and plain.status_code == 200, guided.text
    params = json.loads(Image.open(io.BytesIO(guided.content)).text[PARAMS_KEY])
    assert params["prompt"] == "a red silk dress" and params["text_guidance"] == 3.0
    assert not np.array_equal(decode_rgb(guided.content, "a"), decode_rgb(plain.content, "b"))  # the prompt acted
    assert bad.status_code == 422 and "negative embedding's token" in bad.json()["error"]
    info = json.loads(a1111.json()["info"])
    assert "prompt" not in info["ignored"] and info["r2r"]["text_guidance"] == 3.0
    assert np.array_equal(decode_rgb(base64.b64decode(a1111.json()["images"][0]), "c"),
                          decode_rgb(guided.content, "a"))


@pytest.mark.parametrize(("case", "status", "words"), [
    ("not an image", 400, "cannot read image"),
    ("empty", 400, "empty"),
    ("truncated", 400, "cannot read image"),
    ("bad crc", 400, "cannot read image"),
    ("too large", 413, "over"),
    ("text body", 415, "content type text/plain"),
    ("unknown field", 422, "unknown field color"),
    ("prompt too long", 422, "prompt: text of at most"),
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
        "unknown field": {**post, "url": "/v1/translate?color=red", "content": png},
        "prompt too long": {**post, "url": "/v1/translate?prompt=" + "x" * 5000, "content": png},
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
    post = {"method": "POST", "url": "/v1/translate?color=x", "content": renders[0].read_bytes()}
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


@pytest.fixture
def page_server(replica) -> Any:
    """The app on an in-process replica, served by uvicorn on a free port of 127.0.0.1 (what a browser needs)."""
    import threading

    import uvicorn

    app = build_app(ServeSettings(method=replica.translator.runtime.method), InProcess(replica))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(timeout=0.05)
        assert thread.is_alive(), "uvicorn stopped before it started"
    yield f"http://127.0.0.1:{server.config.port}/"
    server.should_exit = True
    thread.join(timeout=30)


def _chromium() -> Any:
    """Headless Chromium through Selenium and the system's chromedriver (CI installs both: .ci/run)."""
    import os
    import shutil

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if browser is None or driver is None:
        if os.environ.get("R2R_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (CI installs them)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(arg)
    opts.binary_location = browser
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)


def test_the_page_translates_a_chosen_render_with_progress_and_gives_the_apis_bytes(
        page_server: str, renders: list[Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    api = httpx.post(page_server + "v1/translate", content=renders[1].read_bytes(),
                     headers={"content-type": "image/png"}, timeout=120)
    assert api.status_code == 200, api.text
    browser = _chromium()
    try:
        browser.get(page_server)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert browser.find_element(By.ID, "steps").get_attribute("value") == str(METHOD.steps)  # the bundle's
        browser.find_element(By.ID, "files").send_keys(str(renders[1]))
        row = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "li.result[data-state]"))
        assert row.get_attribute("data-state") == "done", row.text
        assert row.get_attribute("data-steps") == str(2 * int(METHOD.steps * METHOD.strength))  # every step shown
        link = row.find_element(By.CSS_SELECTOR, "a.download")
        assert link.is_displayed() and link.get_attribute("download") == "render1.r2r.png"
        got = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
            "  let s = ''; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); done(btoa(s));"
            "}).catch(e => done('failed: ' + e));",
            link.get_attribute("href"))
        assert base64.b64decode(got) == api.content  # the same PNG, byte for byte
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()


# Run with Ray's own API against the service's Ray (its GCS address in argv[1]): kill one translation replica, or
# wait until the Translation deployment is healthy again with every replica running.
RAY_CONTROL = """
import sys, time
import ray
from ray import serve
ray.init(address=sys.argv[1], namespace="serve", logging_level="ERROR")
if sys.argv[2] == "kill":
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "Translation" in a["name"] and "REPLICA" in a["name"]]
    ray.kill(ray.get_actor(names[0], namespace="serve"))
    print(names[0])
else:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        d = serve.status().applications["r2r"].deployments["Translation"]
        if d.status == "HEALTHY" and d.replica_states.get("RUNNING", 0) == int(sys.argv[3]):
            print("healthy")
            break
        time.sleep(0.5)
"""


def _ray(gcs: str, *args: str) -> str:
    import os
    import subprocess
    import sys

    # a local cluster Ray starts has token auth on (the token in the user's Ray folder); a client given an address
    # uses it when told to
    done = subprocess.run([sys.executable, "-c", RAY_CONTROL, gcs, *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_r2r_serve_on_ray_serve_batches_load_survives_a_lost_replica_and_stops_on_sigterm(
        embedded_bundle: Path, renders: list[Path], replica) -> None:
    """The command itself, on Ray Serve on a free port of 127.0.0.1 with two replicas: 32 concurrent requests of two
    sizes all answered, each with its own image, some in batches of two; a replica killed with Ray's API under load:
    the requests it held get a 503 with Retry-After (none a 500, none another request's image), and once Serve has
    replaced it every request is answered again; then SIGTERM: exit 0, no process left."""
    import re

    import psutil

    images = [load_rgb(p) for p in renders]
    images += [np.ascontiguousarray(im[:, ::-1]) for im in images]  # two distinct images of each size
    bodies = [png_bytes(im) for im in images]
    alone = [decode_rgb(asyncio.run(replica.translate(Job(im, "x"))).png, "alone").astype(int) for im in images]
    server = Server(["--engine", str(embedded_bundle), "--backend", "onnxruntime", "--steps", "4", "--strength",
                     "0.5", "--replicas", "2", "--max-batch-size", "2", "--batch-wait-ms", "50", "--threads", "1"],
                    ready_timeout_s=240)
    try:
        gcs = re.search(r"Ray at (\S+)", server.log).group(1)
        family = psutil.Process(server.proc.pid).children(recursive=True)
        url = server.url

        async def load(order: list[int], during: Any = None) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                calls = [asyncio.ensure_future(client.post(url, content=bodies[i],
                                                           headers={"content-type": "image/png"})) for i in order]
                if during is not None:
                    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                    await asyncio.to_thread(during)
                return list(await asyncio.gather(*calls))

        def own_image(i: int, r: httpx.Response) -> bool:
            got = decode_rgb(r.content, "answer").astype(int)
            return got.shape == alone[i].shape and int(np.abs(got - alone[i]).max()) <= 2  # fp32 across batches

        order = [k % len(images) for k in range(32)]
        answers = asyncio.run(load(order))
        assert [r.status_code for r in answers] == [200] * 32, [r.text[:200] for r in answers if r.status_code != 200]
        assert all(own_image(i, r) for i, r in zip(order, answers, strict=True))
        assert max(int(r.headers["x-r2r-batch"]) for r in answers) == 2  # serve.batch filled batches

        killed: list[str] = []
        answers = asyncio.run(load(order[:16], during=lambda: killed.append(_ray(gcs, "kill"))))
        statuses = [r.status_code for r in answers]
        assert killed and set(statuses) <= {200, 503}, statuses
        assert 503 in statuses, statuses  # the killed replica held requests
        assert all(r.headers.get("retry-after") for r in answers if r.status_code == 503)
        assert all(own_image(i, r) for i, r in zip(order[:16], answers, strict=True) if r.status_code == 200)

        assert _ray(gcs, "wait", "2") == "healthy"  # Serve replaced the replica by itself
        answers = asyncio.run(load(order[:8]))
        assert [r.status_code for r in answers] == [200] * 8
        assert all(own_image(i, r) for i, r in zip(order[:8], answers, strict=True))
        metrics = httpx.get(server.base + "metrics").text
        assert 'r2r_requests_total{route="/v1/translate",status="503"}' in metrics

        assert server.stop() == 0  # SIGTERM
        _, alive = psutil.wait_procs(family, timeout=30)
        assert alive == [], [p.pid for p in alive]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
