"""`r2r-bench ray`: images/s of one `r2r-run` process against `r2r-run --ray local` on the same renders, as a
user runs them (each a fresh process on a bundle built beforehand), and where Ray's time goes (docs/scale-out.md).

One process: `--threads T`. Ray: T actors x 1 thread. From each run: the wall time of the command, the time to the
first output, and the steady rate between the first and the last output (Ray's records carry when each arrived;
one process reports its own rate after loading). The difference in time to the first output is Ray's fixed cost
(starting a cluster, workers importing r2r, each actor opening the bundle); the steady rates compare the work.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from r2r.log import log

RUN = [sys.executable, "-c", "from r2r.runtime.cli import main; main()"]


def _renders(folder: Path, count: int, size: tuple[int, int]) -> None:
    from PIL import Image

    from r2r.training.data import render_pair, sample_design

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = render_pair(sample_design(np.random.default_rng([23, i]), size), size)[0]
        Image.fromarray(img).save(folder / f"render{i:03d}.png")


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stderr


def _summary_rate(log_text: str) -> float:
    found = re.findall(r"\(([0-9.]+) img/s;", log_text)
    return float(found[-1]) if found else float("nan")


def ray_report(out: Path, count: int = 20, threads: int = 2) -> dict[str, Any]:
    from r2r.runtime.assembly import RunConfig, prepare_run
    from r2r.runtime.ray_run import RESULTS_FILE

    renders = out / "renders"
    _renders(renders, count, (256, 256))
    prepared = prepare_run(RunConfig())  # the embedded default's bundle and the default engines, built once here
    base = [*RUN, "--engine", str(prepared.root), "--backend", prepared.row.name, "--precision", prepared.precision,
            "--input", str(renders)]
    log(f"r2r-bench ray: {count} renders, {prepared.row.name} {prepared.precision}")
    one_wall, one_log = _timed([*base, "--output", str(out / "one"), "--threads", str(threads)])
    log(f"  one process, {threads} threads          {one_wall:6.1f} s")
    start = time.time()
    ray_wall, _ = _timed([*base, "--output", str(out / "ray"), "--ray", "local", "--actors", str(threads),
                                "--threads", "1"])
    log(f"  ray local, {threads} actors x 1 thread  {ray_wall:6.1f} s")
    records = [json.loads(x) for x in (out / "ray" / RESULTS_FILE).read_text().splitlines()]
    arrived = sorted(r["finished_at"] for r in records if r["status"] == "ok")
    same = sum(np.array_equal(np.asarray(_open(out / "one" / Path(r["output"]).name)),
                              np.asarray(_open(Path(r["output"])))) for r in records if r["status"] == "ok")
    translate = sum(r["seconds"] for r in records if r["status"] == "ok")
    return {
        "images": count, "backend": prepared.row.name, "precision": prepared.precision,
        "one_process": {"threads": threads, "wall_s": round(one_wall, 2), "images_per_s_wall": count / one_wall,
                        "images_per_s_after_load": _summary_rate(one_log)},
        "ray_local": {"actors": threads, "threads_per_actor": 1, "wall_s": round(ray_wall, 2),
                      "images_per_s_wall": count / ray_wall,
                      "first_output_s": round(arrived[0] - start, 2),
                      "images_per_s_steady": (len(arrived) - 1) / (arrived[-1] - arrived[0])
                      if len(arrived) > 1 else float("nan"),
                      "translate_s_per_image": translate / len(arrived)},
        "outputs_identical": f"{same} of {len(arrived)}",
    }


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


__all__ = ["ray_report"]
