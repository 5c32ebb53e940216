"""INT8 for OpenVINO: the routed UNet quantized with NNCF, calibrated on the method's own trajectories.

Calibration samples are the routed `unet`'s inputs as the coupled program binds them, recorded while the PyTorch
reference translates a few renders; hybrid scheme (INT8 weights alone for weighted MatMuls, INT8 x INT8 for the
convolutions and attention), the VAE float. Writes `engines/openvino/int8/`, compiled for `--precision int8`.
Why: docs/design.md, "Backends".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r2r import graph_io
from r2r.config import Method
from r2r.locks import writes_bundle
from r2r.log import log
from r2r.manifest import ENGINES_DIR, EngineEntry, Manifest, bundle_path, read_manifest, record_file, write_manifest
from r2r.models import EMBEDDING_FILE, sha256_tree

INT8_DIR = f"{ENGINES_DIR}/openvino/int8"
DEFAULT_RENDERS = 4


def calibration_renders(manifest: Manifest, count: int = DEFAULT_RENDERS, seed: int = 4321) -> list[np.ndarray]:
    """Procedural renders at the bundle's size (the dataset generator's rendered domain), seeded."""
    from r2r.training.data.designs import sample_design
    from r2r.training.data.render import render_pair

    size = (manifest.width, manifest.height)
    return [render_pair(sample_design(np.random.default_rng([seed, i]), size), size)[0] for i in range(count)]


def record_unet_inputs(model_dir: Path, embedding: Path, renders: Sequence[np.ndarray], width: int, height: int,
                       method: Method) -> list[dict[str, np.ndarray]]:
    """The routed unet's inputs over the method's trajectories on `renders`, one render at a time."""
    import torch

    from r2r.models import load_components
    from r2r.reference import ReferencePipeline

    seen: list[tuple[str, torch.Tensor, int, torch.Tensor]] = []
    ref = ReferencePipeline(load_components(model_dir), embedding, width, height)
    ref.observer = lambda stage, z, t, cond: seen.append((stage, z.detach().clone(), t, cond.detach().clone()))
    for render in renders:
        ref([render], method)

    def sample(z: torch.Tensor, t: int, cond: torch.Tensor, src: list[int]) -> dict[str, np.ndarray]:
        return {graph_io.SAMPLE: z.float().numpy(), graph_io.TIMESTEP: np.array([t], np.float32),
                graph_io.ENCODER_HIDDEN_STATES: cond.float().numpy(), graph_io.TAC_SRC: np.array(src, np.int64)}

    out = []
    i = 0
    while i < len(seen):
        stage, z, t, cond = seen[i]
        if stage == "generation_cg":  # with the next [neg, null] pass: the fused TAC step
            _, pair, _, pair_cond = seen[i + 1]
            out.append(sample(torch.cat([z, pair]), t, torch.cat([cond, pair_cond]), [0, 1, 0]))
            i += 2
            continue
        out.append(sample(z, t, cond, list(range(z.shape[0]))))
        i += 1
    return out


def _weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls one of whose inputs is a weight (a Constant, possibly through a Convert)."""
    def is_weight(node: Any) -> bool:
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and any(is_weight(op.input_value(k).get_node()) for k in range(2))]


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise ImportError("INT8 needs NNCF: pip install 'r2r[int8]'") from exc
    return nncf


def quantize_unet(onnx_path: Path, samples: list[dict[str, np.ndarray]], out: Path) -> dict[str, Any]:
    """The hybrid INT8 UNet as an OpenVINO IR at `out` (.xml, with its .bin)."""
    nncf = import_nncf()
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.Core().read_model(str(onnx_path))
    weighted = _weighted_matmuls(model)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                       ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    quantized = nncf.quantize(
        compressed, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
        ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)))
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return {"nncf": nncf.__version__, "weight_only_matmuls": len(weighted), "samples": len(samples),
            "scheme": "hybrid: INT8 weights of MatMuls with weights; INT8 weights and activations elsewhere"}


@writes_bundle
def build_int8_unet(bundle: str | Path, model_dir: Path, embedding: Path | None = None,
                    renders: Sequence[np.ndarray] | None = None,
                    progress: Callable[[str], None] = log) -> EngineEntry:
    """Calibrate on the method's trajectories and write the INT8 UNet IR into the bundle; recorded in the manifest
    as openvino/cpu-int8/unet."""
    nncf = import_nncf()

    from r2r.engines.openvino import ROW

    root = Path(bundle)
    manifest = read_manifest(root)
    if manifest.source.get("model_sha256") not in (None, sha256_tree(model_dir)):
        raise ValueError(f"{model_dir} is not the model the bundle {root} was exported from; calibrate with that "
                         "model (--model)")
    embedding = embedding or model_dir / EMBEDDING_FILE
    renders = list(renders) if renders is not None else calibration_renders(manifest)
    method = Method(tac_divisor=manifest.tac_plan["divisor"])
    key = hashlib.sha256(json.dumps([manifest.graphs[graph_io.UNET].key, nncf.__version__, len(renders),
                                     [hashlib.sha256(r.tobytes()).hexdigest() for r in renders]]).encode()).hexdigest()
    slot = ROW.slot("cpu", "int8", graph_io.UNET)
    t0 = time.perf_counter()
    progress(f"  {slot:<36} recording the UNet's inputs on {len(renders)} renders (PyTorch reference)")
    samples = record_unet_inputs(model_dir, embedding, renders, manifest.width, manifest.height, method)
    progress(f"  {slot:<36} quantizing with NNCF on {len(samples)} calibration inputs")
    rel = f"{INT8_DIR}/{graph_io.UNET}.xml"
    info = quantize_unet(bundle_path(root, manifest.graphs[graph_io.UNET].file), samples, bundle_path(root, rel))
    files = [rel, rel.removesuffix(".xml") + ".bin"]
    manifest = read_manifest(root)
    for f in files:
        record_file(root, manifest, f)
    entry = EngineEntry("openvino", "int8", graph_io.UNET, files, key,
                        {**info, "renders": len(renders), "build_seconds": round(time.perf_counter() - t0, 1)})
    manifest.engines[slot] = entry
    write_manifest(root, manifest)
    progress(f"  {slot:<36} built in {entry.info['build_seconds']:.1f} s")
    return entry


__all__ = ["DEFAULT_RENDERS", "INT8_DIR", "build_int8_unet", "calibration_renders", "quantize_unet",
           "record_unet_inputs"]
