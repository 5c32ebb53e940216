"""Prompts per image (docs/design.md, "Prompts"): the one definition of how a prompt becomes the text encoder's
token ids (cut at its 77 tokens with a warning that says so; the negative embedding's token refused, since the
domain term already carries it), and a small cache of conditionings, one per distinct prompt, for the reference and
the runtime alike (each with its own text encoder)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from r2r.errors import R2RError
from r2r.log import log

C = TypeVar("C")
PROMPT_CACHE = 64  # distinct prompts whose conditioning is kept (a catalogue's captions repeat per garment)


class PromptError(R2RError, ValueError):
    """A prompt r2r will not use, with why."""


def words(prompt: str) -> list[str]:
    """The prompt's words as an embedding's token would appear among them ("<rendered>", "bad-render")."""
    return re.findall(r"<[^<>\s]+>|[\w-]+", prompt)


def check_prompt(prompt: str, token: str) -> None:
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt is text, got {type(prompt).__name__}")
    if token in words(prompt):
        raise PromptError(f"prompt {prompt!r} holds the negative embedding's token {token!r}: the domain term "
                          "(--guidance) already guides away from it; leave it out of the prompt")


def tokenize(tokenizer: Any, prompt: str, token: str, warn: Callable[[str], None] = log) -> np.ndarray:
    """int64 [1, L] ids (L: the tokenizer's model_max_length, 77), padded; a longer prompt is cut, and `warn` says
    so with the count."""
    check_prompt(prompt, token)
    limit = int(tokenizer.model_max_length)
    n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    if n > limit:
        warn(f"r2r: prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {n} tokens; the text encoder takes "
             f"{limit}, so it was cut to {limit}")
    ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=True).input_ids
    return np.asarray([ids], np.int64)


class ConditioningCache(Generic[C]):
    """prompt -> its conditioning [1, 77, d], computed once by `encode(ids)` and kept for the `keep` most recently
    used prompts."""

    def __init__(self, tokenizer: Any, token: str, encode: Callable[[np.ndarray], C], keep: int = PROMPT_CACHE,
                 warn: Callable[[str], None] = log) -> None:
        self.tokenizer, self.token, self.encode, self.keep, self.warn = tokenizer, token, encode, keep, warn
        self._by_prompt: OrderedDict[str, C] = OrderedDict()
        self.computed = 0  # conditionings computed so far (the cache's misses)

    def __call__(self, prompt: str) -> C:
        if prompt not in self._by_prompt:
            self._by_prompt[prompt] = self.encode(tokenize(self.tokenizer, prompt, self.token, self.warn))
            self.computed += 1
        self._by_prompt.move_to_end(prompt)
        while len(self._by_prompt) > self.keep:
            self._by_prompt.popitem(last=False)
        return self._by_prompt[prompt]

    def check(self, prompts: Sequence[str | None]) -> None:
        """Refuse a batch's prompts before any work (each by its own words)."""
        for p in prompts:
            if p:
                check_prompt(p, self.token)


__all__ = ["PROMPT_CACHE", "ConditioningCache", "PromptError", "check_prompt", "tokenize", "words"]
