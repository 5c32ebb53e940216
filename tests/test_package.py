"""Packaging: the stage folders install under r2r, never as top-level `runtime` or `export`."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md


def test_stage_packages_are_namespaced_under_r2r() -> None:
    for stage in ("training", "export", "engines", "runtime", "benchmarks"):
        assert importlib.import_module(f"r2r.{stage}").__name__ == f"r2r.{stage}"


def test_the_distribution_installs_no_top_level_stage_module() -> None:
    dist = md.distribution("r2r")
    top = set((dist.read_text("top_level.txt") or "").split())
    assert top <= {"r2r"}, top
    # An editable install maps importable names to folders in a generated finder module.
    for f in dist.files or []:
        if f.name.startswith("__editable__") and f.name.endswith("_finder.py"):
            line = next(x for x in f.read_text().splitlines() if x.startswith("MAPPING"))
            mapping = ast.literal_eval(line.split("=", 1)[1].strip())
            assert mapping and all(name == "r2r" or name.startswith("r2r.") for name in mapping), mapping


def test_console_scripts_point_into_r2r() -> None:
    eps = {ep.name: ep.value for ep in md.entry_points(group="console_scripts") if ep.name.startswith("r2r-")}
    assert eps == {
        "r2r-train": "r2r.training.cli:main",
        "r2r-export": "r2r.engines.cli:main",  # export's `onnx` + engines' `build-engines`
        "r2r-run": "r2r.runtime.cli:main",
        "r2r-serve": "r2r.serve.cli:main",
        "r2r-bench": "r2r.benchmarks.cli:main",
    }
