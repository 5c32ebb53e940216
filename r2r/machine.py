"""What a run was measured or built on: CPU, memory, accelerators, library versions."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
from pathlib import Path
from typing import Any

PACKAGES = ("r2r", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "openvino", "numpy", "tensorrt")


def cpu_identity() -> dict[str, Any]:
    """The CPU's model name and vector ISA flags (AVX2, AVX-512, AMX, VNNI, FMA): what decides which kernels an engine
    compiles, so what keys compiled artefacts and recorded verdicts."""
    return _cpuinfo()


def _cpuinfo() -> dict[str, Any]:
    info: dict[str, Any] = {}
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and "model" not in info:
                info["model"] = value.strip()
            elif key == "flags" and "flags" not in info:
                flags = set(value.split())
                info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni", "fma")))
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    return frozenset()


def describe_machine() -> dict[str, Any]:
    mem = None
    if Path("/proc/meminfo").is_file():
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem = round(int(first.split()[1]) / 1024 / 1024, 1)
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpuinfo(), "logical_cpus": cpus, "memory_gib": mem, "os": platform.platform(),
            "python": platform.python_version(), "gpu": "none" if shutil.which("nvidia-smi") is None else "present",
            "versions": versions}


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): the high-water mark of its own address space (VmHWM).

    Not `getrusage().ru_maxrss`: on Linux that survives fork and exec, so a worker started by a large parent would
    report at least the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
