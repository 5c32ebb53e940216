"""Prompts per image (docs/design.md, "Prompts"): the one definition of how a prompt becomes the text encoder's
token ids (cut at its 77 tokens with a warning that says so; the negative embedding's token refused, since the
domain term already carries it), and a small cache of conditionings, one per distinct prompt, for the reference and
the runtime alike (each with its own text encoder)."""

from __future__ import annotations

import json
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
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


def text_weights(prompts: Sequence[str | None] | None, text_guidance: float) -> list[float] | None:
    """Each image's text guidance in a batch (0 for one without a prompt), or None where the batch has no text rows:
    no image has a prompt, or w_t is 0 (the paper's program exactly). The one rule of when text rows exist."""
    if text_guidance == 0 or not prompts or not any(prompts):
        return None
    return [text_guidance if p else 0.0 for p in prompts]


# A prompts file is small text: one record per image. Past this it is not one (a hostile or mistaken path).
MAX_PROMPTS_FILE_BYTES = 64 << 20
MAX_PROMPT_CHARS = 4096  # far past 77 tokens: a longer "prompt" is not one


class PromptTable:
    """`--prompts FILE`: the `metadata.jsonl` an r2r dataset and diffusers' ImageFolder write, one JSON object per
    line with `file_name` (relative to the file's folder) and `text`. An input's prompt is the record of its path
    relative to that folder, else of its file name where one record has it; an input without a record has none."""

    def __init__(self, source: str, by_name: dict[str, str]) -> None:
        self.source, self.by_name = source, by_name
        self.folder = Path(source).resolve().parent
        # by file name alone, where one record has it (an input from elsewhere: a copy, a URL)
        names = Counter(PurePosixPath(k).name for k in by_name)
        self.by_base = {PurePosixPath(k).name: v for k, v in by_name.items() if names[PurePosixPath(k).name] == 1}

    @classmethod
    def read(cls, path: str | Path) -> PromptTable:
        p = Path(path)
        try:
            if p.stat().st_size > MAX_PROMPTS_FILE_BYTES:
                raise PromptError(f"{p}: over {MAX_PROMPTS_FILE_BYTES >> 20} MB; a prompts file holds one short "
                                  "record per image")
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PromptError(f"{p}: cannot be read as UTF-8 text ({exc})") from exc
        by_name: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{p}:{n}: not a JSON object ({exc.msg}); each line is "
                                  '{"file_name": "...", "text": "..."}') from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str) \
                    or not isinstance(rec.get("text"), str):
                raise PromptError(f'{p}:{n}: each line is {{"file_name": "...", "text": "..."}} (both strings)')
            if len(rec["text"]) > MAX_PROMPT_CHARS:
                raise PromptError(f"{p}:{n}: a text of {len(rec['text'])} characters; a prompt is at most "
                                  f"{MAX_PROMPT_CHARS}")
            name = PurePosixPath(rec["file_name"].replace("\\", "/")).as_posix()
            if by_name.get(name, rec["text"]) != rec["text"]:
                raise PromptError(f"{p}:{n}: {name} has two different texts")
            by_name[name] = rec["text"]
        return cls(str(p), by_name)

    def for_input(self, path: str | Path) -> str | None:
        """The prompt of an input (a path or a URL), None where the file has no record of it."""
        text = str(path)
        if "://" not in text:
            try:
                rel = Path(text).resolve().relative_to(self.folder).as_posix()
            except ValueError:
                rel = None
            if rel is not None and rel in self.by_name:
                return self.by_name[rel]
        return self.by_base.get(PurePosixPath(text.replace("\\", "/")).name)


__all__ = ["MAX_PROMPTS_FILE_BYTES", "MAX_PROMPT_CHARS", "PROMPT_CACHE", "ConditioningCache", "PromptError",
           "PromptTable", "check_prompt", "text_weights", "tokenize", "words"]
