"""Prompts at run time (docs/design.md, "Prompts"): the bundle's text encoder graph, fp32 on ONNX Runtime's CPU
provider whatever the backend (one call per distinct prompt, kept in `r2r.prompts.ConditioningCache`), and the text
rows a batch of prompts gives the scheduler.

The encoder checks itself when it opens: the empty prompt must give the bundle's own c_null (recorded at export
by the PyTorch text encoder), so a prompt is never encoded by a graph that disagrees with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from r2r import graph_io
from r2r.config import Method
from r2r.errors import R2RError
from r2r.manifest import BundleError, bundle_path
from r2r.prompts import ConditioningCache, text_weights
from r2r.runtime.bundle_reader import Bundle

# How far the empty prompt's encoding may be from the bundle's c_null (both fp32, the same weights: only the order
# of floating-point operations differs).
SELF_CHECK_ATOL = 1e-3


class PromptEncoderError(R2RError, RuntimeError):
    """The bundle's text encoder does not give the model's conditioning; no prompt is encoded by it."""


@dataclass(frozen=True)
class TextRows:
    """A batch's text rows: the conditioning of each image's prompt (an image without one: c_null) and its text
    guidance (0 without a prompt)."""

    cond: np.ndarray  # [k, 77, d] float32
    weights: np.ndarray  # [k] float32


class PromptEncoder:
    """prompt -> conditioning [1, 77, d], with the bundle's text encoder and tokenizer."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        import onnxruntime as ort
        from transformers import CLIPTokenizer

        from r2r.engines.onnxruntime import open_session

        entry = bundle.manifest.text_encoder
        if not entry:
            raise BundleError(f"{bundle.root}: the bundle has no text encoder, so it cannot take a prompt; export one "
                              f"with it: `r2r-export onnx --text-encoder --out {bundle.root}` with its model (or run "
                              "without --engine: r2r-run exports it into its cache)")
        self.bundle = bundle
        tokenizer = CLIPTokenizer.from_pretrained(bundle_path(bundle.root, entry["tokenizer"]), local_files_only=True)
        self.session = open_session(ort, bundle_path(bundle.root, entry["file"]), threads, ["CPUExecutionProvider"])
        self.cache: ConditioningCache[np.ndarray] = ConditioningCache(tokenizer, str(entry["token"]), self._encode)
        got = self._encode(np.asarray([tokenizer("", padding="max_length",
                                                 max_length=tokenizer.model_max_length).input_ids], np.int64))
        err = float(np.abs(got - bundle.c_null).max()) if got.shape == bundle.c_null.shape else float("inf")
        if not err <= SELF_CHECK_ATOL:
            raise PromptEncoderError(
                f"{bundle.root}: its text encoder gives the empty prompt {err:.3g} away from the bundle's c_null "
                f"(at most {SELF_CHECK_ATOL} expected); re-export the bundle with `r2r-export onnx --text-encoder`")

    def _encode(self, ids: np.ndarray) -> np.ndarray:
        out = self.session.run([graph_io.TEXT_EMBEDDINGS], {graph_io.INPUT_IDS: ids})[0]
        return np.ascontiguousarray(out, np.float32)

    def check(self, prompts: Sequence[str | None]) -> None:
        """Refuse a batch's prompts before any work."""
        self.cache.check(prompts)

    def rows(self, prompts: Sequence[str | None], method: Method) -> TextRows | None:
        """The text rows of a batch (None where no image has a prompt or w_t is 0: the program without text rows,
        the paper's exactly)."""
        weights = text_weights(prompts, method.text_guidance)
        if weights is None:
            return None
        self.check(prompts)
        cond = np.concatenate([self.cache(p) if p else self.bundle.c_null for p in prompts])
        return TextRows(cond, np.asarray(weights, np.float32))


__all__ = ["PromptEncoder", "PromptEncoderError", "TextRows"]
