"""The bundle manifest (docs/design.md, "The bundle"): schema, atomic writing and verification.

One module reads and writes `manifest.json` for every stage: export fills the graphs and
conditioning, engines add their builds, the runtime verifies hashes before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from r2r.atomic import atomic_write
from r2r.errors import R2RError
from r2r.models import sha256_file

MANIFEST = "manifest.json"
FORMAT = "r2r-bundle"
FORMAT_VERSION = 3  # 2: `unet` routes TAC by tac_src and replaces unet_fused; 3: dynamic sizes
ONNX_DIR = "onnx"
COND_FILE = "cond/conditioning.safetensors"
CANARY_DIR = "canary"  # each graph's recorded outputs on a fixed input (r2r/canary.py)
REFIT_DIR = "refit"  # weight maps of a refittable bundle, one JSON per graph
REFIT_PENDING = "refit_pending"  # in `source` while `r2r-export refit` runs: the bundle must not be used
ENGINES_DIR = "engines"


class BundleError(R2RError, ValueError):
    """A bundle that cannot be used as it is; the message names the file and the command that fixes it."""


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # free dims by the contract's expressions ("B", "2*B", "4*hm"; r2r.graph_io)
    dtype: str  # numpy dtype name

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], list(d["shape"]), d["dtype"])


@dataclass
class GraphEntry:
    file: str  # relative to the bundle
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    key: str  # hash of everything the graph was made from; unchanged key = nothing to rebuild
    external_data: bool = False
    refit_map: str = ""  # the graph's weight map (export/weight_map.py), relative to the bundle; "" if not refittable

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEntry:
        return cls(d["file"], [TensorSpec.from_dict(t) for t in d["inputs"]],
                   [TensorSpec.from_dict(t) for t in d["outputs"]], d["key"], d.get("external_data", False),
                   d.get("refit_map", ""))


@dataclass
class EngineEntry:
    """One built graph for one backend and precision."""

    backend: str
    precision: str
    graph: str
    files: list[str]
    key: str
    info: dict[str, Any] = field(default_factory=dict)  # versions, GPU, session options, parity

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineEntry:
        return cls(d["backend"], d["precision"], d["graph"], list(d["files"]), d["key"], dict(d.get("info", {})))


@dataclass
class Manifest:
    source: dict[str, Any]  # model dir name, model/embedding sha256, token
    width: int
    height: int
    batch_min: int
    batch_max: int
    latent: dict[str, int]  # channels, height, width
    scaling_factor: float
    tac_plan: dict[str, Any]  # TACPlan.as_dict() plus the target
    schedule: dict[str, Any]  # scheduler config + method defaults
    # multiple, min, opt, max ([W, H]): the sizes the graphs take (sides multiples of `multiple`; min = max: static)
    sizes: dict[str, Any] = field(default_factory=dict)
    graphs: dict[str, GraphEntry] = field(default_factory=dict)
    cond: dict[str, Any] = field(default_factory=dict)  # file, key, tensor specs
    # the prompt encoder (docs/design.md, "Prompts"): file, tokenizer folder, key, the embedding's token, I/O specs;
    # empty in a bundle exported without it
    text_encoder: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    engines: dict[str, EngineEntry] = field(default_factory=dict)  # "backend/precision/graph" -> entry
    # "<graph>@<W>x<H>" -> {graph, size, file, key}: each graph's recorded outputs on a fixed input (r2r/canary.py)
    canaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    # sha256 of manifest.json as read (not written into it): the identity of the bundle, recorded with each output
    sha256: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: v for f, v in zip(fields(self), asdict(self).values(), strict=True) if f.name != "sha256"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(f"not an r2r bundle manifest (format {d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {d.get('format_version')} is not {FORMAT_VERSION}; "
                "re-export it with `r2r-export onnx`"
            )
        d = {k: v for k, v in d.items() if k != "sha256"}
        d["graphs"] = {k: GraphEntry.from_dict(v) for k, v in d.get("graphs", {}).items()}
        d["engines"] = {k: EngineEntry.from_dict(v) for k, v in d.get("engines", {}).items()}
        return cls(**d)


def read_manifest(bundle: str | Path) -> Manifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing; make the bundle with `r2r-export onnx --out {bundle}`")
    blob = path.read_bytes()
    try:
        manifest = Manifest.from_dict(json.loads(blob))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: malformed manifest ({exc}); re-export with `r2r-export onnx`") from exc
    manifest.sha256 = hashlib.sha256(blob).hexdigest()
    return manifest


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Write atomically: a crash mid-write leaves the previous manifest, never half of one."""
    path = atomic_write(Path(bundle) / MANIFEST, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    manifest.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return path


def bundle_path(bundle: str | Path, relative: str) -> Path:
    """Resolve a manifest-relative path, refusing any that leaves the bundle."""
    root = Path(bundle).resolve()
    p = (root / relative).resolve()
    if root != p and root not in p.parents:
        raise BundleError(f"{relative}: path leaves the bundle {root}")
    return p


def record_file(bundle: str | Path, manifest: Manifest, relative: str) -> str:
    digest = sha256_file(bundle_path(bundle, relative))
    manifest.files[relative] = digest
    return digest


def verify_files(bundle: str | Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Refuse a bundle whose files do not match their recorded hashes."""
    for rel, digest in manifest.files.items():
        if only is not None and rel not in only:
            continue
        p = bundle_path(bundle, rel)
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing; rebuild with `r2r-export onnx --out {bundle}`")
        if sha256_file(p) != digest:
            raise BundleError(
                f"{p}: contents do not match the manifest's sha256; rebuild with `r2r-export onnx --out {bundle}`"
            )
