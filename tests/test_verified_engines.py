"""Engines verified, never trusted (docs/design.md, "Verified engines"): each graph's canary recorded at export and
checked whenever a backend opens it; a wrong blob recompiled, a graph that misses twice refused by name; a crash on
first use recorded and never loaded again; known engine bugs skipped; no non-finite image delivered; one OpenVINO
cache folder per configuration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.engines import NanImageBackend, negate_conv_kernels, zero_blob_weights

from r2r import graph_io
from r2r.backends import KNOWN_ISSUES, known_issue
from r2r.canary import BOUNDS, canary_slot, load_cases
from r2r.config import Method, Variant
from r2r.manifest import ENGINES_DIR, BundleError, bundle_path, read_manifest, write_manifest
from r2r.runtime.assembly import RunConfig, open_runtime, prepare_run
from r2r.runtime.backend_ort import OrtBackend
from r2r.runtime.bundle_reader import open_bundle
from r2r.runtime.scheduler import CoupledScheduler, DegenerateOutput, program_graphs
from r2r.runtime.select import DeviceUnavailable
from r2r.runtime.trial import VERDICTS_FILE, TrialSpec, check_first_use, read_verdicts, run_child
from r2r.runtime.verify import EngineRejected, verify_graphs

FUSED = program_graphs(Variant(fused=True))
METHOD = Method(steps=10, strength=0.5)


def _copy(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    """The bundle's graphs without its engines (a session's other tests may have built some into it): the manifest
    lists none."""
    root = Path(shutil.copytree(bundle, tmp_path / name, ignore=shutil.ignore_patterns("verdicts.json", "engines")))
    m = read_manifest(root)
    m.engines, m.files = {}, {f: h for f, h in m.files.items() if not f.startswith(f"{ENGINES_DIR}/")}
    write_manifest(root, m)
    return root


def _quiet(lines: list[str]):
    return lines.append


def test_export_records_each_graphs_canary_from_onnxruntime_fp32(tiny_bundle: Path) -> None:
    import onnxruntime as ort

    m = read_manifest(tiny_bundle)
    size = tuple(m.sizes["min"])
    for graph, entry in m.graphs.items():
        canary = m.canaries[canary_slot(graph, size)]
        assert canary["file"] in m.files and canary["by"].startswith("onnxruntime")
        cases = load_cases(bundle_path(tiny_bundle, canary["file"]))
        assert [c.multiple for c in cases] == list(graph_io.CALL_MULTIPLES[graph])
        sess = ort.InferenceSession(str(bundle_path(tiny_bundle, entry.file)), providers=["CPUExecutionProvider"])
        for case in cases:
            assert set(case.inputs) == {t.name for t in entry.inputs}
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, case.inputs), strict=True))
            for name, want in case.outputs.items():
                assert np.isfinite(want).all() and np.abs(want).max() > 0, (graph, name)
                np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("backend", "precision"), [("onnxruntime", "fp32"), ("openvino", "fp32"),
                                                    ("openvino", "bf16")])
def test_each_backend_passes_the_canaries_of_the_embedded_default_within_its_bound(
        embedded_bundle: Path, backend: str, precision: str) -> None:
    from r2r.runtime.backend_ov import OpenVinoBackend

    b = open_bundle(embedded_bundle)
    be = OrtBackend(b) if backend == "onnxruntime" else OpenVinoBackend(b, precision)
    verified = verify_graphs(be, b, [g for g in graph_io.DEFAULT_GRAPHS if g not in graph_io.STEP_GRAPHS])
    assert not verified.retried
    for r in verified.results:
        assert r.ok and r.bound == BOUNDS[precision], r.describe()
        if precision == "bf16":  # the check measures: bf16 differs from the fp32 record
            assert r.error > 1e-4, r.describe()


def test_a_blob_that_computes_wrong_numbers_is_removed_and_compiled_again(tiny_bundle: Path, tmp_path: Path) -> None:
    from r2r.engines.openvino import cache_folder
    from r2r.runtime.backend_ov import OpenVinoBackend

    root = _copy(tiny_bundle, tmp_path)
    b = open_bundle(root)
    assert verify_graphs(OpenVinoBackend(b, "fp32", 1), b,
                         [graph_io.VAE_DECODER]).results[0].ok  # compiles, keeps a blob
    folder = cache_folder(root, b.manifest, graph_io.VAE_DECODER, "fp32", 1, __import__("openvino").__version__)
    bad = zero_blob_weights(folder).read_bytes()
    said: list[str] = []
    verified = verify_graphs(OpenVinoBackend(b, "fp32", 1), b, [graph_io.VAE_DECODER], progress=said.append)
    assert verified.retried == (graph_io.VAE_DECODER,) and verified.results[0].ok
    assert "missed its canary" in said[0] and "removed its compiled blob" in said[0], said
    assert next(folder.iterdir()).read_bytes() != bad  # compiled again, and kept


def test_a_graph_that_misses_twice_is_refused_by_name_and_auto_passes_every_row_over(tiny_bundle: Path,
                                                                                       tmp_path: Path) -> None:
    """A vae_decoder whose weights were changed behind the manifest (hash re-recorded, as a bad rewrite would):
    every engine computes the wrong numbers from it, so each backend is refused, naming the graph and the error."""
    root = _copy(tiny_bundle, tmp_path)
    negate_conv_kernels(root, graph_io.VAE_DECODER)
    b = open_bundle(root)
    with pytest.raises(EngineRejected, match=r"onnxruntime fp32: the vae_decoder graph missed its canary twice "
                                             r"\(vae_decoder x1 image: relative error"):
        verify_graphs(OrtBackend(b), b, [graph_io.VAE_ENCODER, graph_io.VAE_DECODER], progress=lambda _: None)
    said: list[str] = []
    with pytest.raises(DeviceUnavailable, match=r"passed over: openvino .* onnxruntime fp32 .*vae_decoder"):
        open_runtime(RunConfig(engine=root, method=METHOD), progress=said.append)
    checked = [s for s in said if s.startswith("r2r: first-use check of")]  # each row tried in its own child
    assert [s.split()[4] for s in checked] == ["openvino", "onnxruntime"], said
    assert all("the vae_decoder graph missed its canary twice" in s for s in checked), said


def test_a_crash_on_first_use_is_recorded_and_auto_takes_the_next_row(embedded_bundle: Path, tmp_path: Path) -> None:
    from r2r.backends import backend_row

    root = _copy(embedded_bundle, tmp_path)
    b = open_bundle(root)
    precision = backend_row("openvino").native_precision()
    spec = TrialSpec(str(root), "openvino", "cpu", precision, 0, FUSED)
    crash = [sys.executable, "-c", "import os, signal; print('open vae_encoder', flush=True); print('ok vae_encoder', "
             "flush=True); print('open unet', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"]
    with pytest.raises(EngineRejected, match=r"the unet graph crashed the process that tried it \(signal 11, SIG"):
        check_first_use(b, spec, progress=lambda _: None, command=crash)
    verdicts = {v["graph"]: v for v in read_verdicts(root).values()}
    assert verdicts["unet"]["verdict"] == "crashed" and verdicts["unet"]["machine"]["model"]
    assert "vae_encoder" not in verdicts  # tried once only: it passed no second open
    never = [sys.executable, "-c", "raise SystemExit(99)"]  # a child would fail the check with TrialFailed
    with pytest.raises(EngineRejected, match="when it was first tried on this machine"):
        check_first_use(b, spec, progress=lambda _: None, command=never)
    said: list[str] = []
    run = prepare_run(RunConfig(engine=root, method=METHOD), progress=said.append)
    assert (run.row.name, run.precision) == ("onnxruntime", "fp32")
    assert any(f"passed over openvino {precision}" in s and "signal 11" in s and "using onnxruntime fp32" in s
               for s in said), said


def test_the_first_use_is_checked_in_a_child_once_then_by_the_canary_alone(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    said: list[str] = []
    cfg = RunConfig(engine=root, backend="onnxruntime", threads=1, method=METHOD)
    open_runtime(cfg, progress=said.append).close()
    assert any("first use of onnxruntime fp32" in s for s in said), said
    verdicts = read_verdicts(root)
    assert sorted(v["graph"] for v in verdicts.values()) == sorted(FUSED)
    assert {v["verdict"] for v in verdicts.values()} == {"ok"}
    said.clear()
    rt = open_runtime(cfg, progress=said.append)
    assert not any("first use" in s for s in said), said
    assert any(s.startswith(f"r2r: onnxruntime fp32 canaries: {len(FUSED)} graphs in ") and "(bound 0.001)" in s
               for s in said), said
    assert rt.verified is not None and {r.graph for r in rt.verified.results} == set(FUSED)
    assert json.loads((root / VERDICTS_FILE).read_text()) == verdicts


@pytest.mark.parametrize(("backend", "precision", "opened"), [("onnxruntime", "fp32", 1), ("openvino", "fp32", 2)])
def test_the_child_opens_twice_only_a_backend_whose_first_open_compiles_a_cache(
        backend: str, precision: str, opened: int, tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    seen = tmp_path / "child.out"
    tee = tmp_path / "tee.py"  # the real child, its stdout kept
    tee.write_text("import subprocess, sys\n"
                   "p = subprocess.run([sys.executable, '-m', 'r2r.runtime.trial', sys.argv[-1]], "
                   "capture_output=True, text=True)\n"
                   f"open({str(seen)!r}, 'w').write(p.stdout); sys.stdout.write(p.stdout); sys.exit(p.returncode)\n")
    spec = TrialSpec(str(root), backend, "cpu", precision, 1, ("vae_decoder",))
    outcome = run_child(spec, command=[sys.executable, str(tee)], progress=lambda _: None)
    assert outcome.passed == ("vae_decoder",) and outcome.failed is None
    assert seen.read_text().splitlines().count("open vae_decoder") == opened


def test_a_bundle_without_canaries_is_refused_with_the_command_that_records_them(tiny_bundle: Path,
                                                                                   tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    m = read_manifest(root)
    for entry in m.canaries.values():
        del m.files[entry["file"]]
    m.canaries = {}
    write_manifest(root, m)
    cfg = RunConfig(engine=root, backend="onnxruntime", threads=1, method=METHOD)
    with pytest.raises(BundleError, match=f"r2r-export canary --bundle {root}"):
        open_runtime(cfg, progress=lambda _: None)
    out = subprocess.run([str(Path(sys.executable).with_name("r2r-export")), "canary", "--bundle", str(root)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert len(read_manifest(root).canaries) == len(m.graphs)
    open_runtime(cfg, progress=lambda _: None).close()


@pytest.mark.parametrize("issue", KNOWN_ISSUES, ids=lambda k: f"{k.backend}-{k.precision}")
def test_a_known_engine_bug_is_skipped_by_auto_and_refused_by_name(issue, tiny_bundle: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    flags = frozenset(issue.cpu_flags[:1])
    assert known_issue(issue.backend, issue.precision, True, flags) is issue
    assert known_issue(issue.backend, issue.precision, True, frozenset({"avx512f"})) is None
    assert (known_issue(issue.backend, issue.precision, False, flags) is None) == issue.dynamic_sizes
    monkeypatch.setattr("r2r.backends.cpu_flags", lambda: flags)  # this machine, as one of the CPUs it names
    root = _copy(tiny_bundle, tmp_path)
    with pytest.raises(EngineRejected, match=issue.reference.replace("/", ".")):
        prepare_run(RunConfig(engine=root, backend=issue.backend, precision=issue.precision, method=METHOD),
                    progress=lambda _: None)
    with pytest.raises(DeviceUnavailable, match=f"passed over: {issue.backend} {issue.precision}"):
        prepare_run(RunConfig(engine=root, precision=issue.precision, method=METHOD), progress=lambda _: None)


def test_a_non_finite_image_is_not_delivered_and_the_others_are(tiny_bundle: Path, tmp_path: Path,
                                                                 stripes_image) -> None:
    from r2r.runtime.translator import deliver_batch
    from r2r.sizing import Placement

    b = open_bundle(tiny_bundle)
    m = METHOD
    imgs = [stripes_image(21), stripes_image(22)]
    clean = CoupledScheduler(b, OrtBackend(b), 2, m)(imgs)
    poisoned = CoupledScheduler(b, NanImageBackend(b, row=1), 2, m)
    with pytest.raises(DegenerateOutput, match="image 2 of 2: the final latent holds NaN or Inf") as caught:
        poisoned(imgs)
    assert caught.value.outputs[1] is None and np.array_equal(caught.value.outputs[0], clean[0])
    place = Placement((256, 256), (256, 256), (256, 256), (0, 0), "pad", (256, 256))
    batch = [(tmp_path / "in" / "good.png", imgs[0], place), (tmp_path / "in" / "bad.png", imgs[1], place)]
    results = deliver_batch(poisoned, batch, tmp_path / "out", {"backend": "test"})
    assert [r.status for r in results] == ["ok", "failed"]
    assert results[1].input.endswith("bad.png") and "not delivered: the final latent holds NaN" in results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    # r2r-run --ray: an actor's records for the same batch (results.jsonl), one ok, one failed with the reason
    from dataclasses import asdict

    from r2r.runtime.outputs import params_hash
    from r2r.runtime.ray_run import TranslateActor

    class Poisoned:  # the actor's Translator, translating with the poisoned scheduler
        translate_batch = staticmethod(poisoned)

    actor = object.__new__(TranslateActor)  # what __init__ sets after opening the run
    actor.translator, actor.params, actor.phash = Poisoned(), {"backend": "test"}, params_hash({"backend": "test"})
    items = [{"input": str(p), "output": str(tmp_path / "ray" / p.name), "placement": asdict(place)}
             for p, _, _ in batch]
    records = {Path(r["input"]).name: r for r in actor.translate(items, np.stack(imgs))}
    assert records["good.png"]["status"] == "ok" and records["bad.png"]["status"] == "failed"
    assert "the final latent holds NaN" in records["bad.png"]["error"]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["good.png"]


def test_openvino_keeps_one_blob_folder_per_precision_and_thread_count(tiny_bundle: Path, tmp_path: Path) -> None:
    """OpenVINO names a CPU blob by the model alone; r2r's folders keep fp32 and bf16, 1 and 2 threads apart."""
    import openvino as ov

    from r2r.engines.openvino import CACHE_DIR, cache_folder, compile_graph

    root = _copy(tiny_bundle, tmp_path)
    m = read_manifest(root)
    configs = [("fp32", 1), ("bf16", 1), ("fp32", 2)]
    for precision, threads in [*configs, ("fp32", 1)]:
        compile_graph(ov, root, m, graph_io.VAE_DECODER, precision, threads, progress=lambda _: None)
    folders = [cache_folder(root, m, graph_io.VAE_DECODER, p, t, ov.__version__) for p, t in configs]
    assert sorted(p.name for p in bundle_path(root, CACHE_DIR).iterdir()) == sorted(f.name for f in folders)
    blobs = [[p.name for p in f.iterdir()] for f in folders]
    assert all(len(names) == 1 for names in blobs) and len({names[0] for names in blobs}) == 1  # OpenVINO's name
    assert (folders[0] / blobs[0][0]).read_bytes() != (folders[1] / blobs[1][0]).read_bytes()  # fp32 vs bf16
