"""The model source a command or a `Translator` is given (`--model/--lora/--embedding/--token`), resolved once: a
checkpoint converted, LoRAs fused, the embedding under its token, each made once into the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from r2r.checkpoints import resolve_model
from r2r.log import log
from r2r.lora import LoraSpec, check_lora, fuse_loras, parse_lora
from r2r.models import EMBEDDED_DEFAULT, EMBEDDING_FILE, with_token


@dataclass(frozen=True)
class ModelSource:
    """What a bundle is made from, as given. `model` None: the embedded default; `embedding` None: the model's own
    (MODEL/negative_embedding.safetensors); `token`: read the embedding under another token."""

    model: Path | None = None
    lora: tuple[LoraSpec, ...] = ()
    embedding: Path | None = None
    token: str | None = None

    @classmethod
    def of(cls, model: str | Path | None = None, lora: Sequence[LoraSpec | str] = (),
           embedding: str | Path | None = None, token: str | None = None) -> ModelSource:
        """From the API's loose forms: paths as strings, LoRAs as "FILE[:SCALE]"."""
        return cls(None if model is None else Path(model),
                   tuple(s if isinstance(s, LoraSpec) else parse_lora(s) for s in lora),
                   None if embedding is None else Path(embedding), token)

    @property
    def given(self) -> list[str]:
        """The flags given (a bundle given with --engine carries its own model)."""
        names = {"--model": self.model, "--lora": self.lora, "--embedding": self.embedding, "--token": self.token}
        return [flag for flag, value in names.items() if value]

    def resolve(self, progress: Callable[[str], None] = log) -> ResolvedSource:
        """The model as a diffusers directory (converted and LoRA-fused, once) and the embedding file (under its
        token). Raises ModelLoadError naming the file."""
        model = resolve_model(self.model, progress) if self.model is not None else EMBEDDED_DEFAULT
        model = fuse_loras(model, [check_lora(s) for s in self.lora], progress)
        embedding = self.embedding or model / EMBEDDING_FILE
        if self.token is not None:
            embedding = with_token(embedding, self.token)
        return ResolvedSource(model, embedding)


@dataclass(frozen=True)
class ResolvedSource:
    model: Path  # a diffusers directory
    embedding: Path  # a negative embedding file


__all__ = ["ModelSource", "ResolvedSource"]
