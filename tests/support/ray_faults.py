"""A translating actor that dies mid-batch once, for the Ray tests: on its second batch it writes the batch's first
output, then exits the process (as an OOM kill or a lost node would), once per marker folder. Ray restarts the
actor and retries the batch; nothing may be lost or written twice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from r2r.runtime.outputs import write_output
from r2r.runtime.ray_run import TranslateActor, placement_from
from r2r.sizing import restore

MARKER_ENV = "R2R_TEST_FAULT_DIR"  # where the one death is recorded (set in the test cluster's runtime_env)


class DiesOnSecondBatch(TranslateActor):
    calls = 0

    def translate(self, items: list[dict[str, Any]], images: np.ndarray) -> list[dict[str, Any]]:
        self.calls += 1
        marker = Path(os.environ[MARKER_ENV]) / "died"
        if self.calls == 2 and items and not marker.exists():
            first = items[0]
            out = self.translator.translate_batch(list(images))[0]
            write_output(Path(first["output"]), restore(out, placement_from(first["placement"])), self.params,
                         Path(first["input"]).name)
            marker.write_text(first["input"])
            os._exit(1)
        return super().translate(items, images)
