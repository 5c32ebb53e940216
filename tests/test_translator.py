"""`r2r.Translator`, the public API (runtime/translator.py): the README's example runs; its images are `r2r-run`'s
bit for bit on mixed sizes; a bad file is refused by name and fails alone in `translate_files`; progress per image
and per step; one Translator shared by threads; parameters refused by flag name."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from r2r import Method, Translator
from r2r.errors import FlagError, R2RError
from r2r.imageio import ImageReadError, load_rgb

METHOD = Method(steps=4, strength=0.5)
SIZES = [(256, 256), (256, 192), (256, 192), (200, 150)]  # three sizes; 200x150 is padded to the multiple


def _renders(folder: Path) -> list[Path]:
    from r2r.training.data import render_pair, sample_design

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        img = render_pair(sample_design(np.random.default_rng([31, i]), (w, h)), (w, h))[0]
        paths.append(folder / f"render{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _renders(tmp_path_factory.mktemp("translator") / "in")


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_translate_on_mixed_sizes_equals_r2r_run_bit_for_bit(embedded_bundle: Path, renders: list[Path],
                                                              tmp_path: Path, backend: str) -> None:
    from r2r.runtime.cli import main

    res = CliRunner().invoke(main, ["--engine", str(embedded_bundle), "--backend", backend, "--input",
                                    str(renders[0].parent), "--output", str(tmp_path / "cli"), "--steps", "4",
                                    "--strength", "0.5", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    events = []
    with Translator(engine=embedded_bundle, backend=backend, batch_size=2, method=METHOD) as t:
        result = t.translate([str(p) for p in renders], progress=events.append)
        again = t.translate([Image.open(renders[0]), load_rgb(renders[1])])  # PIL image, uint8 array
        params = t.params
    assert [im.size for im in result.images] == SIZES
    for p, im in zip(renders, result.images, strict=True):
        assert np.array_equal(np.asarray(im), load_rgb(tmp_path / "cli" / p.name)), p.name
    assert np.array_equal(np.asarray(again[0]), np.asarray(result[0]))
    assert np.array_equal(np.asarray(again[1]), np.asarray(result[1]))
    assert result.params == params and params["steps"] == 4 and params["tac_divisor"] == 256
    assert [e.done for e in events if e.kind == "image"] == [1, 2, 3, 4]
    steps = [e for e in events if e.kind == "step"]  # host backends run the program op by op: one per step
    assert steps and steps[-1].done == steps[-1].total == 4  # 2 inversion + 2 generation steps per batch


def test_a_method_given_per_call_equals_a_translator_opened_with_it(embedded_bundle: Path,
                                                                    renders: list[Path]) -> None:
    """A server's requests carry their own method: the call's images and record are those of a Translator opened
    with that method; a method the bundle was not built for is refused by flag name."""
    other = Method(steps=5, strength=0.4, guidance=5.0, tac_ratio=0.5)
    inputs = [str(p) for p in renders[:2]]
    with Translator(engine=embedded_bundle, backend="onnxruntime", method=METHOD) as t:
        per_call = t.translate(inputs, method=other)
        default = t.translate(inputs)
        with pytest.raises(R2RError, match="--tac-divisor 64"):
            t.translate(inputs, method=Method(tac_divisor=64))
    with Translator(engine=embedded_bundle, backend="onnxruntime", method=other) as t:
        opened = t.translate(inputs)
    for a, b in zip(per_call, opened, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert per_call.params == opened.params and per_call.params["steps"] == 5 and per_call.params["guidance"] == 5.0
    assert default.params["steps"] == 4 and not np.array_equal(np.asarray(default[0]), np.asarray(per_call[0]))


def test_a_bad_file_is_refused_by_name_and_fails_alone_in_translate_files(embedded_bundle: Path, renders: list[Path],
                                                                           tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(renders[0].parent, folder)
    (folder / "broken.png").write_bytes(renders[0].read_bytes()[:200])  # truncated
    with Translator(engine=embedded_bundle, backend="onnxruntime", batch_size=2, method=METHOD) as t:
        with pytest.raises(ImageReadError, match=r"broken\.png"):
            t.translate([str(folder / "render0.png"), str(folder / "broken.png")])
        summary = t.translate_files([str(folder)], tmp_path / "out")
        resumed = t.translate_files(str(folder), tmp_path / "out", resume=True)
    assert summary.count("ok") == 4 and [Path(r.input).name for r in summary.failed] == ["broken.png"]
    assert "broken.png" in summary.failed[0].error
    assert re.match(r"r2r-run: 4 written, 0 skipped \(complete\), 1 failed in ", summary.line(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"render{i}.png" for i in range(4)]
    assert resumed.count("skipped") == 4 and resumed.count("ok") == 0


def test_threads_share_one_translator_and_get_what_one_thread_gets(embedded_bundle: Path, renders: list[Path]) -> None:
    with Translator(engine=embedded_bundle, backend="onnxruntime", method=METHOD) as t:
        alone = [np.asarray(t.translate([str(p)])[0]) for p in renders[:2]]
        got: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            got[i] = np.asarray(t.translate([str(renders[i % 2])])[0])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)
    assert len(got) == 4 and all(np.array_equal(got[i], alone[i % 2]) for i in range(4))


def test_parameters_that_do_not_apply_are_refused_by_flag_name(embedded_bundle: Path, tiny_model_dir: Path) -> None:
    cases = [({"engine": embedded_bundle, "model": tiny_model_dir}, "--model"),
             ({"engine": embedded_bundle, "width": 128}, "--width"),
             ({"backend": "reference", "fused": "on"}, "--fused"),
             ({"backend": "reference", "precision": "bf16"}, "fp32 only"),
             ({"batch_size": 0}, "--batch-size"),
             ({"engine": embedded_bundle, "backend": "onnxruntime", "precision": "bf16"}, "takes fp32"),
             ({"fit": "zoom"}, "--fit zoom")]
    for kwargs, named in cases:
        with pytest.raises(FlagError, match=re.escape(named)):
            Translator(**kwargs)
    with pytest.raises(R2RError, match="--tac-divisor 64"):  # the bundle's own refusal, r2r's type
        Translator(engine=embedded_bundle, backend="onnxruntime", method=Method(tac_divisor=64))
    with pytest.raises(ValueError, match="no denoising step"):
        Method(steps=10, strength=0.05)


def test_the_readmes_python_example_runs(default_bundle: Path, renders: list[Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    cache = tmp_path / "cache"  # the embedded default's bundle where Translator() looks for it
    shutil.copytree(default_bundle, cache / "bundles" / default_bundle.name)
    monkeypatch.setenv("R2R_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    shutil.copy(renders[1], tmp_path / "render.png")
    shutil.copytree(renders[0].parent, tmp_path / "renders")
    exec(compile(example, "README.md (Python API)", "exec"), {})
    assert Image.open(tmp_path / "photo.png").size == SIZES[1]
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == [f"render{i}.png" for i in range(4)]
    assert "r2r-run: 4 written" in capsys.readouterr().out
