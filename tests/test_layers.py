"""The stages import one way (docs/design.md, "Architecture"): training -> export -> engines -> runtime -> benchmarks,
each only `r2r/` and the stages before it; `r2r/` imports no stage; nothing installed imports the test doubles.

Imports are read with `ast` from every module of the installed packages (pyproject's package-dir), function-level
imports included. `pytest -s tests/test_layers.py` prints the folder import graph.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from r2r.backends import BACKENDS

REPO = Path(__file__).resolve().parents[1]
STAGES = ("r2r", "training", "export", "engines", "runtime", "serve", "benchmarks")  # the flow; r2r/ is shared, first
NOT_INSTALLED = ("support", "tests", "tools")  # the test doubles and the extractors


def package_dirs(repo: Path) -> dict[str, str]:
    cfg = tomllib.loads((repo / "pyproject.toml").read_text())
    return cfg["tool"]["setuptools"]["package-dir"]


def folder_edges(repo: Path) -> dict[tuple[str, str], list[str]]:
    """(importing folder, imported folder or test-double package) -> where: every import between folders."""
    dirs = sorted(package_dirs(repo).items(), key=lambda kv: -len(kv[0]))

    def folder_of(module: str) -> str | None:
        for pkg, folder in dirs:
            if module == pkg or module.startswith(pkg + "."):
                return Path(folder).parts[0]
        top = module.split(".")[0]
        return top if top in NOT_INSTALLED else None

    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for _, folder in dirs:
        for path in sorted((repo / folder).glob("*.py")):  # a package's own folder; subpackages have their own row
            src = Path(folder).parts[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                for dst in {folder_of(n) for n in names} - {None, src}:
                    edges[(src, dst)].append(f"{path.relative_to(repo)}:{node.lineno}")
    return dict(edges)


def violations(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """Every edge that goes against the flow (or into something not installed)."""
    bad = []
    for (src, dst), where in sorted(edges.items()):
        if dst in NOT_INSTALLED or dst not in STAGES or STAGES.index(dst) >= STAGES.index(src):
            bad.append(f"{src} -> {dst}: {', '.join(where[:3])}")
    return bad


def test_stage_folders_import_only_r2r_and_the_stages_before_them() -> None:
    edges = folder_edges(REPO)
    print("\nfolder imports (importing -> imported: count)")
    for (src, dst), where in sorted(edges.items(), key=lambda e: (STAGES.index(e[0][0]), e[0][1])):
        print(f"  {src} -> {dst}: {len(where)}")
    assert ("runtime", "engines") in edges  # the reader found the imports at all
    assert violations(edges) == []


def test_the_check_catches_a_function_level_import_against_the_flow(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"r2r" = "r2r"\n"r2r.export" = "export"\n"r2r.runtime" = "runtime"\n')
    for folder in ("r2r", "export", "runtime"):
        (tmp_path / folder).mkdir()
    (tmp_path / "runtime" / "run.py").write_text("from r2r.export import bundle\n")  # with the flow
    (tmp_path / "export" / "bundle.py").write_text("def f():\n    from r2r.runtime.run import x\n")  # against it
    (tmp_path / "r2r" / "tac.py").write_text("import support.gpu_sim\n")  # a test double
    bad = violations(folder_edges(tmp_path))
    assert bad == ["export -> runtime: export/bundle.py:2", "r2r -> support: r2r/tac.py:1"]


def test_no_test_double_or_api_listing_is_installed() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any("trt_api" in p or "support" in p or "tests" in p for p in cfg["packages"])
    # package data: the embedded default and r2r-serve's page, nothing else
    assert cfg.get("package-data", {}) == {"r2r": ["embedded/**/*"], "r2r.serve": ["page/*"]}
    for folder in set(package_dirs(REPO).values()):
        names = [p.name for p in (REPO / folder).rglob("*.py")]
        assert not [n for n in names if any(w in n for w in ("sim", "fake", "stub", "strict"))], folder
        assert not list((REPO / folder).rglob("*_api.json")), folder


@pytest.mark.parametrize("row", BACKENDS, ids=lambda r: r.name)
def test_backend_rows_name_a_builder_in_engines_and_a_runtime_in_runtime(row) -> None:
    assert row.builder is None or row.builder.startswith("r2r.engines.")
    assert row.runtime.startswith("r2r.runtime.")
    assert row.builder is None or callable(importlib.import_module(row.builder).build)
    module = importlib.import_module(row.runtime)
    assert callable(module.open_backend)
    assert set(row.native) <= set(row.precisions) and set(row.available()) <= set(row.devices)
    assert row.slot(row.devices[0], row.precisions[0], "unet").startswith(f"{row.name}/")


def test_the_default_cpu_precision_follows_the_cpus_bf16_units() -> None:
    from r2r.backends import backend_row

    ov = backend_row("openvino")
    assert ov.native_precision(frozenset({"avx512f", "avx512_bf16"})) == "bf16"
    assert ov.native_precision(frozenset({"amx_bf16", "amx_tile"})) == "bf16"
    assert ov.native_precision(frozenset({"avx2", "avx512f"})) == "fp32"  # bf16 would be emulated: slower
    assert backend_row("onnxruntime").native_precision(frozenset()) == "fp32"


def test_auto_prefers_the_gpu_then_openvino_then_onnxruntime_on_the_cpu(monkeypatch) -> None:
    import onnxruntime as ort

    from r2r import backends

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    names = [(row.name, dev) for row, dev in backends.auto_choices()]
    assert names[:2] == [("openvino", "cpu"), ("onnxruntime", "cpu")]  # no GPU here: TensorRT is not usable
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert next((r.name, d) for r, d in backends.auto_choices()) == ("onnxruntime", "cuda")
    assert next((r.name, d) for r, d in backends.auto_choices("cpu")) == ("openvino", "cpu")
