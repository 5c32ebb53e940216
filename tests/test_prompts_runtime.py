"""Prompts at run time (docs/design.md, "Prompts"): the bundle's text encoder checks itself and encodes each distinct
prompt once; the fused program gains the text rows ([neg, null, text] and [cg, neg, null, text]) and follows the
reference on every backend; without a prompt or at weight 0 it is today's program, the same calls and the same
bytes; each image of a batch gets its own prompt."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from support import gpu_sim
from support.bundles import copy_bundle, set_batch_dims
from support.engines import RecordingBackend
from support.independent import H, W, render_image

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.errors import FlagError
from r2r.manifest import BundleError, read_manifest, write_manifest
from r2r.metrics import psnr
from r2r.models import load_components
from r2r.reference import ReferencePipeline
from r2r.runtime.assembly import RunConfig, open_runtime
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.outputs import PARAMS_KEY
from r2r.runtime.prompt_encoder import PromptEncoder, PromptEncoderError
from r2r.runtime.scheduler import CoupledScheduler, TextRowsUnsupported, program_graphs

QUICK = {"steps": 10, "strength": 0.5, "cache_interval": 1}
PROMPTS = ["a red silk dress", "a blue denim jacket, faded"]
FUSED = Variant(fused=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> ReferencePipeline:
    return ReferencePipeline(load_components(tiny_model_dir), tiny_model_dir / "negative_embedding.safetensors", W, H)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [render_image(5), render_image(6)]


@pytest.fixture(scope="module")
def runtime(tiny_bundle: Path):
    with_prompts = open_runtime(RunConfig(engine=tiny_bundle, backend="onnxruntime", precision="fp32", batch=2,
                                          method=Method(**QUICK, text_guidance=3.0)), progress=lambda s: None)
    yield with_prompts
    with_prompts.close()


def apart(x: np.ndarray, y: np.ndarray) -> int:
    return int(np.abs(x.astype(int) - y.astype(int)).max())


def text_scheduler(bundle, backend, method: Method, batch: int = 2) -> CoupledScheduler:
    return CoupledScheduler(bundle, backend, batch, bundle.method(method, True), FUSED, text=True)


@pytest.mark.parametrize("text_tac", [True, False])
def test_onnxruntime_fp32_with_prompts_follows_the_reference_at_45_db(runtime, reference, images,
                                                                      text_tac: bool) -> None:
    m = runtime.resolve(Method(**QUICK, text_guidance=3.0, text_tac=text_tac))
    got = runtime(images, method=m, prompts=PROMPTS)
    want = reference(images, m, prompts=PROMPTS)
    plain = reference(images, m, prompts=None)
    for g, e, p in zip(got, want, plain, strict=True):
        db = psnr(g, e)
        print(f"text_tac {text_tac}: ONNX Runtime fp32 vs the reference with a prompt {db:.1f} dB (the prompt moves "
              f"the reference {psnr(e, p):.1f} dB)")
        assert db >= 45.0 and psnr(e, p) < db  # the prompt's term moved the image more than the export does


def test_the_torch_backend_runs_the_text_rows(tiny_bundle: Path, tiny_model_dir: Path, reference, images) -> None:
    from r2r.runtime.backend_torch import TorchBackend

    b = open_bundle(tiny_bundle)
    m = Method(**QUICK, text_guidance=3.0)
    sched = text_scheduler(b, TorchBackend(b, tiny_model_dir, "cpu", "fp32"), m)
    rows = PromptEncoder(b).rows(PROMPTS, b.method(m))
    assert rows is not None
    for g, e in zip(sched(images, text=(rows.cond, rows.weights)), reference(images, b.method(m), prompts=PROMPTS),
                    strict=True):
        assert psnr(g, e) >= 45.0


def test_without_a_prompt_or_at_weight_0_the_runtime_runs_todays_program(runtime, images) -> None:
    today = runtime.resolve(Method(**QUICK))
    want = runtime(images, method=today)
    for method, prompts in ((Method(**QUICK, text_guidance=0.0), PROMPTS), (Method(**QUICK, text_guidance=3.0), None),
                            (Method(**QUICK, text_guidance=3.0), ["", None])):
        got = runtime(images, method=runtime.resolve(method), prompts=prompts)
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)), (method, prompts)
    b = runtime.bundle
    plain, texted = (CoupledScheduler(b, RecordingBackend(b), 2, today, FUSED, text=t) for t in (False, True))
    assert {g for g, _ in plain.backend.calls} == set(program_graphs(FUSED))
    n, window = plain.schedule.n, plain.window
    # per image: the inversion's n, then [cg, neg, null] in the window and the pair after it; one more row with text
    assert plain.unet_evaluations_per_image == n + 3 * window + 2 * (n - window)
    assert texted.unet_evaluations_per_image == n + 4 * window + 3 * (n - window)


def test_each_image_of_a_mixed_batch_gets_its_own_prompt_at_run_time(runtime, images) -> None:
    m = runtime.resolve(Method(**QUICK, text_guidance=3.0))
    batch = runtime(images, method=m, prompts=PROMPTS)
    singles = [runtime([im], method=m, prompts=[p])[0] for im, p in zip(images, PROMPTS, strict=True)]
    swapped = runtime(images, method=m, prompts=PROMPTS[::-1])
    for i in range(2):  # a batch rounds apart from single runs by a unit at most; a swap is far
        assert apart(batch[i], singles[i]) <= 1 and apart(swapped[i], singles[i]) > 16, i
    mixed = runtime(images, method=m, prompts=[PROMPTS[0], None])  # without a prompt: text weight 0
    alone = runtime(images[1:], method=runtime.resolve(Method(**QUICK)))[0]
    assert apart(mixed[0], singles[0]) <= 1 and apart(mixed[1], alone) <= 1


def test_the_text_rows_program_binds_its_batches_at_the_contracts_multiples(tiny_bundle: Path) -> None:
    """The fused step is [cg, neg, null, text] (4B) with the text block routed to the cg block under TAC (to itself
    with text_tac off), the guided batch after the window [neg, null, text] (3B)."""
    b = open_bundle(tiny_bundle)
    for text_tac, text_src in ((True, [0, 1]), (False, [6, 7])):
        be = RecordingBackend(b)
        sched = text_scheduler(b, be, Method(**QUICK, text_guidance=2.0, text_tac=text_tac))
        assert be.download(sched.routed).tolist() == [0, 1, 2, 3, 0, 1, *text_src]
        multiples = {binds[graph_io.SAMPLE][1][0] // 2 for g, binds in be.calls if g == graph_io.UNET}
        assert multiples == {1, 3, 4} and multiples <= set(graph_io.CALL_MULTIPLES[graph_io.UNET])
    with pytest.raises(TextRowsUnsupported, match="fused program"):
        CoupledScheduler(b, OrtBackend(b), 1, b.method(Method(**QUICK), False), Variant(), text=True)
    with pytest.raises(ValueError, match="text rows are given exactly"):
        sched([render_image(1)])  # a text program without the batch's text rows


def test_the_text_encoder_checks_itself_and_a_bundle_without_it_refuses_a_prompt(tiny_bundle: Path) -> None:
    b = open_bundle(tiny_bundle)
    entry = b.manifest.text_encoder
    assert entry["token"] == "<rendered>" and entry["file"] in b.manifest.files
    assert any(f.startswith(f"{graph_io.TOKENIZER_DIR}/") for f in b.manifest.files)
    enc = PromptEncoder(b)
    enc.rows(PROMPTS + PROMPTS[:1], Method(text_guidance=1.0))
    assert enc.cache.computed == 2  # one encoding per distinct prompt
    with pytest.raises(PromptEncoderError, match="re-export"):
        PromptEncoder(dataclasses.replace(b, c_null=b.c_null + 0.05))
    old = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, text_encoder={}))
    with pytest.raises(BundleError, match="r2r-export onnx --text-encoder"):
        PromptEncoder(old)


def test_the_tensorrt_path_runs_the_text_rows_as_onnx_runtime_does(tiny_bundle: Path, images,
                                                                   tmp_path: Path) -> None:
    """guided_text_step on the device, at the addresses bound: bit for bit OrtBackend's host update."""
    from r2r.runtime.backend_trt import TrtBackend
    from r2r.runtime.verify import verify_graphs

    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    for graph in read_manifest(root).graphs:
        set_batch_dims(root, graph, None)
    gpu_sim.build_sim_engines(root, "fp32")
    b = open_bundle(root)
    m = b.method(Method(**QUICK, text_guidance=3.0), True)
    rows = PromptEncoder(b).rows(PROMPTS[:1], m)
    assert rows is not None
    want = text_scheduler(b, OrtBackend(b), m, 1)(images[:1], text=(rows.cond, rows.weights))
    trt, cudart = gpu_sim.sim_modules(root)
    with TrtBackend(b, "fp32", trt=trt, cudart=cudart) as backend:
        graphs = program_graphs(FUSED, step_graphs=True, text=True)
        assert {r.graph for r in verify_graphs(backend, b, graphs).results} >= {graph_io.GUIDED_TEXT_STEP}
        got = text_scheduler(b, backend, m, 1)(images[:1], text=(rows.cond, rows.weights))
    assert np.array_equal(got[0], want[0])


def _run(*args: str) -> Result:
    from r2r.runtime.cli import main

    return CliRunner().invoke(main, list(args))


def _params(png: Path) -> dict:
    return json.loads(Image.open(png).text[PARAMS_KEY])


def test_r2r_run_takes_each_inputs_prompt_from_a_metadata_file_records_it_and_resumes_by_it(
        tiny_bundle: Path, images, tmp_path: Path) -> None:
    src = tmp_path / "renders"
    (src / "tops").mkdir(parents=True)
    Image.fromarray(images[0]).save(src / "tops" / "a.png")
    Image.fromarray(images[1]).save(src / "b.png")
    meta = src / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "tops/a.png", "text": PROMPTS[0]}) + "\n\n"
                    + json.dumps({"file_name": "b.png", "text": PROMPTS[1]}) + "\n")
    out = tmp_path / "out"
    flags = ["--engine", str(tiny_bundle), "--backend", "onnxruntime", "--steps", "10", "--strength", "0.5",
             "--text-guidance", "3", "--batch-size", "2"]
    inputs = ["--input", str(src / "tops" / "a.png"), "--input", str(src / "b.png")]
    res = _run(*inputs, "--output", str(out), "--prompts", str(meta), *flags)
    assert res.exit_code == 0, res.output
    a, b = _params(out / "a.png"), _params(out / "b.png")
    assert (a["prompt"], b["prompt"]) == tuple(PROMPTS) and a["text_guidance"] == 3.0 and a["guidance"] == 7.5
    assert a["text_tac"] is True
    first = (out / "b.png").stat().st_mtime_ns
    # --resume: the same prompts skip; a changed record redoes its input alone
    meta.write_text(json.dumps({"file_name": "tops/a.png", "text": "a green wool coat"}) + "\n"
                    + json.dumps({"file_name": "b.png", "text": PROMPTS[1]}) + "\n")
    res = _run(*inputs, "--output", str(out), "--prompts", str(meta), "--resume", *flags)
    assert res.exit_code == 0, res.output
    assert _params(out / "a.png")["prompt"] == "a green wool coat"
    assert (out / "b.png").stat().st_mtime_ns == first and "1 skipped" in res.output


def test_r2r_run_refuses_prompts_it_cannot_use_before_any_work(tiny_bundle: Path, images, tmp_path: Path) -> None:
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    out = tmp_path / "out"
    base = ["--input", str(tmp_path / "a.png"), "--output", str(out), "--engine", str(tiny_bundle), "--backend",
            "onnxruntime", "--text-guidance", "2"]
    res = _run(*base, "--prompt", "a <rendered> dress")
    assert res.exit_code != 0 and "negative embedding's token" in res.output and not out.exists()
    bad = tmp_path / "metadata.jsonl"
    bad.write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": 3}\n')
    res = _run(*base, "--prompts", str(bad))
    assert res.exit_code == 2 and f"{bad}:2" in res.output
    res = _run(*base, "--prompt", "x", "--prompts", str(bad))
    assert res.exit_code == 2 and "give one" in res.output
    # an old bundle (exported before the text encoder) refuses a prompt with the export command
    old = copy_bundle(tiny_bundle, tmp_path / "old")
    m = read_manifest(old)
    m.files = {f: h for f, h in m.files.items() if f not in (m.text_encoder["file"],)
               and not f.startswith(f"{graph_io.TOKENIZER_DIR}/")}
    m.text_encoder = {}
    write_manifest(old, m)
    res = _run(*base[:5], str(old), *base[6:], "--prompt", "a red dress")
    assert res.exit_code != 0 and "r2r-export onnx --text-encoder" in res.output and not out.exists()


def test_the_api_takes_one_prompt_per_image_or_one_for_all(runtime, images, tmp_path: Path) -> None:
    from r2r.prompts import PromptTable
    from r2r.runtime.translator import prompts_for

    assert prompts_for("a dress", [None, None]) == ["a dress"] * 2
    assert prompts_for(["a", ""], [None, None]) == ["a", None]
    with pytest.raises(FlagError, match="2 prompts for 3 images"):
        prompts_for(["a", "b"], [None] * 3)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x/y.png", "text": "a coat"}) + "\n")
    table = PromptTable.read(tmp_path / "metadata.jsonl")
    assert table.for_input(tmp_path / "x" / "y.png") == "a coat" and table.for_input("s3://b/y.png") == "a coat"
    assert table.for_input(tmp_path / "y" / "z.png") is None
    assert prompts_for(table, [str(tmp_path / "x" / "y.png"), None]) == ["a coat", None]


def test_openvino_runs_the_text_rows(tiny_bundle: Path, reference, images) -> None:
    from r2r.runtime.backend_ov import OpenVinoBackend

    b = open_bundle(tiny_bundle)
    m = b.method(Method(**QUICK, text_guidance=3.0), True)
    rows = PromptEncoder(b).rows(PROMPTS, m)
    assert rows is not None
    got = text_scheduler(b, OpenVinoBackend(b, "fp32", threads=1), m)(images, text=(rows.cond, rows.weights))
    for g, e in zip(got, reference(images, m, prompts=PROMPTS), strict=True):
        print(f"OpenVINO fp32 vs the reference with a prompt: {psnr(g, e):.1f} dB")
        assert psnr(g, e) >= 45.0
