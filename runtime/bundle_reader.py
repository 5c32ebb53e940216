"""Opening a bundle for the runtime: hashes verified, conditioning loaded, method flags checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from r2r import graph_io
from r2r.canary import CanaryCase, canary_key, canary_slot, load_cases
from r2r.config import Method
from r2r.manifest import REFIT_PENDING, BundleError, Manifest, bundle_path, read_manifest, verify_files
from r2r.schedule import Schedule, SchedulerConfig, make_schedule
from r2r.tac import tac_window


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    c_null: np.ndarray  # [1, 77, d] float32
    c_neg: np.ndarray
    scheduler: SchedulerConfig

    @property
    def sha256(self) -> str:
        """The bundle's identity: the hash of its manifest as read (which holds every file's hash)."""
        return self.manifest.sha256

    @property
    def width(self) -> int:
        return self.manifest.width

    @property
    def height(self) -> int:
        return self.manifest.height

    @property
    def channels(self) -> int:
        """The latent's channels."""
        return int(self.manifest.latent["channels"])

    @property
    def multiple(self) -> int:
        """Image sides are multiples of this (8 per latent cell, 2 per UNet downsampling)."""
        return int(self.manifest.sizes["multiple"])

    def size_range(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((min W, min H), (max W, max H)) the graphs take."""
        lo, hi = self.manifest.sizes["min"], self.manifest.sizes["max"]
        return (int(lo[0]), int(lo[1])), (int(hi[0]), int(hi[1]))

    def takes(self, width: int, height: int) -> bool:
        """Whether the graphs run at width x height as it is."""
        (w0, h0), (w1, h1) = self.size_range()
        return not width % self.multiple and not height % self.multiple and w0 <= width <= w1 and h0 <= height <= h1

    def check_size(self, width: int, height: int) -> None:
        if not self.takes(width, height):
            (w0, h0), (w1, h1) = self.size_range()
            raise BundleError(f"{width}x{height}: the bundle takes {w0}..{w1} x {h0}..{h1}, sides multiples of "
                              f"{self.multiple}; re-export with `r2r-export onnx --min-side/--max-side` to widen it")

    @property
    def tac_layers(self) -> list[dict]:
        return list(self.manifest.tac_plan["layers"])

    @property
    def attention_pool(self) -> int:
        """The attention pool the UNet graphs were exported with (1: none; docs/design.md, "Less work per image")."""
        return int(self.manifest.tac_plan.get("pool", 1))

    @property
    def step_cache(self) -> bool:
        """Whether the bundle carries step caching (docs/design.md, "Less work per image"): its graph pair, or for a
        bundle of the torch backend (no graphs), a UNet that supports it."""
        if self.manifest.graphs:
            return all(g in self.manifest.graphs for g in graph_io.STEP_CACHE_GRAPHS)
        return "deep_channels" in self.manifest.latent

    def graph_path(self, name: str) -> Path:
        if name not in self.manifest.graphs:
            raise BundleError(f"{self.root}: the bundle has no {name} graph; re-export with `r2r-export onnx`")
        return bundle_path(self.root, self.manifest.graphs[name].file)

    def canary_cases(self, graph: str, size: tuple[int, int]) -> list[CanaryCase]:
        """`graph`'s canary at `size` (its file's hash was checked when the bundle was opened)."""
        entry = self.manifest.canaries.get(canary_slot(graph, size))
        stale = entry is not None and graph in self.manifest.graphs and \
            entry.get("key") != canary_key(self.manifest.graphs[graph].key, size)
        if entry is None or stale:
            raise BundleError(f"{self.root}: no canary for the {graph} graph at {size[0]}x{size[1]} (its engines "
                              "cannot be checked before they make an image); record them with `r2r-export canary "
                              f"--bundle {self.root}`")
        return load_cases(bundle_path(self.root, entry["file"]))

    @property
    def cache_interval(self) -> int:
        """The step-cache interval of the bundle's model's defaults (kept at export), where the bundle carries step
        caching; else 1."""
        return int(self.manifest.schedule["defaults"].get("cache_interval") or 1) if self.step_cache else 1

    def method(self, given: Method, step_cache: bool = True) -> Method:
        """`given` for this bundle: its TAC divisor, attention pool and, where the program can cache (`step_cache`:
        the fused program), step-cache interval the bundle's where not given (checked by `check`)."""
        return given.complete(self.manifest.tac_plan["divisor"], self.attention_pool,
                              self.cache_interval if step_cache else 1)

    def check(self, method: Method, batch: int) -> None:
        """Refuse flags the bundle was not built for, naming the rebuild."""
        plan = self.manifest.tac_plan
        if method.tac_divisor not in (None, plan["divisor"]):
            raise BundleError(
                f"--tac-divisor {method.tac_divisor}: the bundle's TAC layers were chosen with divisor "
                f"{plan['divisor']}; re-export with `r2r-export onnx --tac-divisor {method.tac_divisor}`")
        if method.attention_pool not in (None, self.attention_pool):
            raise BundleError(
                f"--attention-pool {method.attention_pool}: the bundle's UNet graphs were exported with attention "
                f"pool {self.attention_pool}; export one with `r2r-export onnx --attention-pool "
                f"{method.attention_pool}` (or run without --engine: r2r-run exports it into its cache)")
        if method.interval > 1 and not self.step_cache:
            raise BundleError(
                f"--cache-interval {method.cache_interval}: the bundle {self.root} has no step-cache graphs; export "
                "them with `r2r-export onnx --step-cache` (or run without --engine: r2r-run exports them into its "
                "cache)")
        if method.tac_target != plan.get("target", "null"):
            raise BundleError(f"--tac-target {method.tac_target}: the bundle's graphs control the {plan['target']} "
                              "pass only; the PyTorch reference (--backend reference) takes --tac-target both")
        if not self.manifest.batch_min <= batch <= self.manifest.batch_max:
            raise BundleError(
                f"--batch-size {batch}: the bundle supports {self.manifest.batch_min}-{self.manifest.batch_max}; "
                f"re-export with `r2r-export onnx --batch-max {batch}`")

    def schedule(self, method: Method) -> tuple[Schedule, int]:
        sched = make_schedule(self.scheduler, method)
        return sched, tac_window(sched.n, method.tac_ratio)


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    root = Path(path)
    manifest = read_manifest(root)
    pending = manifest.source.get(REFIT_PENDING)
    if pending:
        raise BundleError(f"{root}: `r2r-export refit` to the model {pending.get('model')} did not finish; run it "
                          f"again (`r2r-export refit --bundle {root} --model MODEL`) before using the bundle")
    if verify:
        verify_files(root, manifest)
    cond_path = bundle_path(root, manifest.cond["file"])
    cond = load_file(str(cond_path))
    if set(cond) != {graph_io.COND_NULL, graph_io.COND_NEG}:
        raise BundleError(f"{cond_path}: expected tensors {graph_io.COND_NULL}, {graph_io.COND_NEG}; re-export the "
                          "bundle")
    sched = SchedulerConfig.from_dict(manifest.schedule["scheduler"])
    return Bundle(root, manifest, cond[graph_io.COND_NULL].astype(np.float32),
                  cond[graph_io.COND_NEG].astype(np.float32), sched)
