"""Prompts and the disentangled two-term guidance in the PyTorch reference (docs/design.md, "Prompts"): the same
numbers as three separate diffusers passes and the formula by hand; today's program exactly without a prompt or at
weight 0; each image of a batch its own prompt; long prompts cut with a warning; the embedding's token refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.independent import H, Independent, W, render_image

from r2r.config import Method
from r2r.models import load_components
from r2r.prompts import ConditioningCache, PromptError, tokenize
from r2r.reference import ReferencePipeline

QUICK = {"steps": 10, "strength": 0.5}
CAPTION = "a red silk dress with white polka dots"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> ReferencePipeline:
    return ReferencePipeline(load_components(tiny_model_dir), tiny_model_dir / "negative_embedding.safetensors", W, H)


@pytest.fixture(scope="module")
def reference64(tiny_model_dir: Path) -> ReferencePipeline:
    """The reference in float64: three batch-1 passes round apart from one batched call on a CPU (about 2e-6 per
    UNet call in float32, which the guidance amplifies past 1e-5 over the steps); in float64 what remains is the
    method's."""
    return ReferencePipeline(load_components(tiny_model_dir, dtype=torch.float64),
                             tiny_model_dir / "negative_embedding.safetensors", W, H)


@pytest.fixture(scope="module")
def independent(tiny_model_dir: Path, reference64: ReferencePipeline) -> Independent:
    """The diffusers implementation in float64, its null and negative conditionings the reference's: those are
    encoded in float32 by design (equal to diffusers' there, test_reference), 1.4e-6 from a float64 encoding. The
    prompt's conditioning stays diffusers' own (`encode_prompt`)."""
    ind = Independent(tiny_model_dir, tiny_model_dir / "negative_embedding.safetensors", torch.float64)
    ind.c_null, ind.c_neg = reference64.c_null.clone(), reference64.c_neg.clone()
    return ind


def _latents(ref: ReferencePipeline, images: list[np.ndarray], m: Method, prompts: list[str] | None
             ) -> torch.Tensor:
    sched = ref.schedule(m)
    c_text, w_text = ref.text_rows(prompts, m, len(images))
    return ref.generate(ref.invert(ref.encode(images), sched), sched, m, None, c_text, w_text)


@pytest.mark.parametrize("method", [Method(**QUICK, text_guidance=1.5),
                                    Method(**QUICK, text_guidance=3.0, guidance=5.0, text_tac=False)])
def test_two_term_guidance_equals_three_diffusers_passes_and_the_formula_by_hand(reference64, independent,
                                                                                 method) -> None:
    image = render_image(3)
    _, expected = independent(image, method, return_latents=True, prompt=CAPTION)
    got = _latents(reference64, [image], method, [CAPTION])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    _, without = independent(image, method, return_latents=True)
    assert (got - without).abs().max() > 1e-3  # the prompt's term moved the latents: the check can fail


def test_without_a_prompt_or_at_weight_0_the_program_is_todays(reference) -> None:
    image = render_image(4)
    today = Method(**QUICK)
    reference.count.by_stage.clear()
    want = reference([image], today)
    calls = dict(reference.count.by_stage)
    for method, prompts in ((Method(**QUICK, text_guidance=0.0), [CAPTION]), (Method(**QUICK, text_guidance=2.0), None),
                            (Method(**QUICK, text_guidance=2.0), [""])):
        reference.count.by_stage.clear()
        assert np.array_equal(reference([image], method, prompts=prompts)[0], want[0])
        assert reference.count.by_stage == calls  # the same UNet calls: no text row


def test_each_image_of_a_mixed_batch_gets_its_own_prompt(reference) -> None:
    images = [render_image(5), render_image(6)]
    m = Method(**QUICK, text_guidance=3.0)
    prompts = ["a red silk dress", "a blue denim jacket, faded"]

    def apart(x: np.ndarray, y: np.ndarray) -> int:
        return int(np.abs(x.astype(int) - y.astype(int)).max())

    batch = reference(images, m, prompts=prompts)
    singles = [reference([im], m, prompts=[p])[0] for im, p in zip(images, prompts, strict=True)]
    swapped = reference(images, m, prompts=prompts[::-1])
    for i in range(2):  # a batch rounds apart from single runs by a unit at most (test_reference); a swap is far
        assert apart(batch[i], singles[i]) <= 1 and apart(swapped[i], singles[i]) > 16, i
    mixed = reference(images, m, prompts=[prompts[0], None])  # the image without a prompt: its text weight is 0
    assert apart(mixed[0], singles[0]) <= 1 and apart(mixed[1], reference(images[1:], Method(**QUICK))[0]) <= 1


def test_a_long_prompt_is_cut_with_a_warning_and_the_embeddings_token_is_refused(reference) -> None:
    said: list[str] = []
    tok = reference.c.tokenizer
    ids = tokenize(tok, " ".join(["dress"] * 100), "<rendered>", said.append)
    assert ids.shape == (1, tok.model_max_length) and len(said) == 1 and "cut to 77" in said[0]
    assert tokenize(tok, CAPTION, "<rendered>", said.append).shape == (1, 77) and len(said) == 1
    for bad in ("a <rendered> dress", "<rendered>"):
        with pytest.raises(PromptError, match="negative embedding's token"):
            tokenize(tok, bad, "<rendered>")
    with pytest.raises(PromptError):
        reference.text_rows(["fine", "a <rendered> shirt"], Method(text_guidance=1.0), 2)
    encoded: list[np.ndarray] = []
    cache = ConditioningCache(tok, "<rendered>", lambda ids: encoded.append(ids) or len(encoded), keep=2)
    assert [cache(p) for p in ("a", "b", "a", "c", "a", "b")] == [1, 2, 1, 3, 1, 4]  # "b" was dropped for "c"
    assert cache.computed == 4
