"""The dataset's fixed vocabulary: named colours, garment kinds, pattern kinds and motifs, and
`CAPTION_WORDS`, every word a caption may contain."""

from __future__ import annotations

# sRGB of the named colours; names are the caption words.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (247, 247, 244),
    "cream": (243, 232, 200),
    "grey": (128, 130, 134),
    "charcoal": (62, 64, 70),
    "navy": (24, 38, 96),
    "blue": (32, 92, 204),
    "teal": (0, 128, 128),
    "mint": (150, 224, 190),
    "green": (32, 140, 62),
    "olive": (112, 116, 40),
    "yellow": (250, 212, 40),
    "mustard": (206, 160, 30),
    "orange": (246, 128, 24),
    "coral": (248, 118, 96),
    "red": (204, 32, 42),
    "burgundy": (122, 22, 48),
    "pink": (240, 122, 172),
    "lavender": (186, 160, 226),
    "purple": (112, 50, 152),
    "brown": (112, 70, 40),
    "beige": (216, 196, 156),
}
# Garment kind -> caption noun phrase.
GARMENTS: dict[str, str] = {
    "tshirt": "tshirt",
    "tank_top": "tank top",
    "sweater": "sweater",
    "jacket": "jacket",
    "coat": "coat",
    "dress": "dress",
    "skirt": "skirt",
    "trousers": "trousers",
    "shorts": "shorts",
}
PLURAL_GARMENTS = frozenset({"trousers", "shorts"})  # captioned as "a pair of ..."
PATTERNS = ("solid", "stripes", "zigzag", "checked", "gingham", "plaid", "dots", "motif", "lettering")
MOTIFS = ("diamond", "cross", "ring", "triangle", "heart", "floral")
_PATTERN_WORDS = ("plain", "striped", "zigzag", "checked", "gingham", "plaid", "polka", "dots", "lettering")
_GLUE_WORDS = ("a", "an", "and", "with", "small", "print", "pair", "of")

# Every word a caption may contain (captions are lowercase words separated by single spaces).
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            *COLORS,
            *(w for phrase in GARMENTS.values() for w in phrase.split()),
            *_PATTERN_WORDS,
            *MOTIFS,
            *_GLUE_WORDS,
        }
    )
)
