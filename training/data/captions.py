"""`caption_for`: a design's short lowercase caption (colours, pattern, garment; no domain words), made
only of `CAPTION_WORDS`."""

from __future__ import annotations

from collections.abc import Sequence

from r2r.training.data.designs import Design
from r2r.training.data.vocab import GARMENTS, PLURAL_GARMENTS


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else " ".join(words[:-1]) + " and " + words[-1]


def caption_for(design: Design) -> str:
    """A short caption from the design, e.g. "a navy and white striped dress" (no domain words)."""
    p, kind = design.pattern, design.garment.kind
    noun = GARMENTS[kind]
    c = list(p.colors)
    if p.kind == "solid":
        body, tail = f"plain {c[0]} {noun}", ""
    elif p.kind in ("dots", "motif", "lettering"):
        accents = _and(c[1:])
        tail = {
            "dots": f" with {accents} polka dots",
            "motif": f" with a small {accents} {p.motif} print",
            "lettering": f" with {accents} lettering",
        }[p.kind]
        body = f"{c[0]} {noun}"
    else:
        adjective = {"stripes": "striped", "zigzag": "zigzag", "checked": "checked", "gingham": "gingham",
                     "plaid": "plaid"}[p.kind]  # fmt: skip
        body, tail = f"{_and(c)} {adjective} {noun}", ""
    if kind in PLURAL_GARMENTS:
        return f"a pair of {body}{tail}"
    article = "an" if body[0] in "aeiou" else "a"
    return f"{article} {body}{tail}"
