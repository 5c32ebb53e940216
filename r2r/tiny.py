"""The tiny Stable-Diffusion-1.x-family model, built locally from a seeded random init.

The family's frozen configs (SD 1.x's architecture, narrower and shallower: 256x256 images, 32x32 latents) and its
CLIP BPE tokenizer; `build_tiny_model` writes a directory that `diffusers.StableDiffusionPipeline.from_pretrained`
loads as it is, offline, safetensors only.
Why: docs/design.md, "Training the embedded default".
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # heavy imports stay lazy: the configs alone must not pull in transformers
    from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "DEFAULTS_FILE",
    "DEFAULT_RESOLUTION",
    "EOS_TOKEN",
    "FASHION_WORDS",
    "LATENT_CHANNELS",
    "MAX_MERGES",
    "MODEL_MAX_LENGTH",
    "TINY_TEXT_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "VAE_SCALE_FACTOR",
    "TextEncoderConfig",
    "UNetConfig",
    "VAEConfig",
    "build_random_embedding",
    "build_tiny_model",
    "build_tokenizer",
    "clip_tokenizer_files",
    "scheduler_kwargs",
    "write_clip_tokenizer",
]

# Default image size (width, height); the latent is 1/8 of it on each side.
DEFAULT_RESOLUTION: tuple[int, int] = (256, 256)
# Spatial factor between image and latent: 2 ** (number of VAE blocks - 1).
VAE_SCALE_FACTOR = 8
# Latent channels of the family (SD 1.x has 4). Eight, because with four this small autoencoder
# averaged the colours of a two-colour pattern within one 8x8 cell and blurred lettering: texture
# preservation is bounded by the autoencoder's round trip, whatever the diffusion method does.
LATENT_CHANNELS = 8
# Written at the model root; the r2r loader reads the model's default resolution from it.
DEFAULTS_FILE = "r2r_defaults.json"

# CLIP's text context: bos + 75 tokens + eos.
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Cap on learned BPE merges, so a large caption vocabulary cannot blow up the embedding table.
MAX_MERGES = 8192


def _check_groups(name: str, channels: tuple[int, ...], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{name}: channels {bad} are not divisible by norm_num_groups={groups}")


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel kwargs of the family; `attention_head_dim` is SD 1.x's (= number of heads)."""

    sample_size: int = 32
    in_channels: int = LATENT_CHANNELS
    out_channels: int = LATENT_CHANNELS
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 4
    norm_num_groups: int = 16

    def __post_init__(self) -> None:
        _check_groups("unet", self.block_out_channels, self.norm_num_groups)
        if not len(self.block_out_channels) == len(self.down_block_types) == len(self.up_block_types):
            raise ValueError("unet: block_out_channels, down_block_types and up_block_types differ in length")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.UNet2DConditionModel`."""
        return asdict(self)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL kwargs of the family; `scaling_factor` is a placeholder that training recalibrates."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = LATENT_CHANNELS
    norm_num_groups: int = 8  # >= 4 channels per group: see r2r.training.vae_init
    sample_size: int = 256
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        _check_groups("vae", self.block_out_channels, self.norm_num_groups)
        if 2 ** (len(self.block_out_channels) - 1) != VAE_SCALE_FACTOR:
            raise ValueError(
                f"vae: {len(self.block_out_channels)} blocks do not make factor {VAE_SCALE_FACTOR}"
            )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.AutoencoderKL`."""
        return asdict(self)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIPTextConfig fields of the family; vocabulary size and special ids come from the tokenizer."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = MODEL_MAX_LENGTH
    hidden_act: str = "quick_gelu"
    projection_dim: int = 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("text encoder: hidden_size is not divisible by num_attention_heads")

    def kwargs(self, tokenizer: CLIPTokenizer) -> dict[str, Any]:
        """Keyword arguments for `transformers.CLIPTextConfig`, completed from `tokenizer`.

        `eos_token_id` must be the tokenizer's real id: CLIPTextModel pools at the first eos (an id of
        2 selects a legacy argmax path that breaks once textual-inversion tokens are appended).
        """
        return {
            **asdict(self),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }


def scheduler_kwargs() -> dict[str, Any]:
    """DDIMScheduler kwargs: SD 1.5's noise schedule (r2r.schedule's defaults), DDIM flags of docs/design.md."""
    from r2r.schedule import SchedulerConfig

    cfg = {k: v for k, v in SchedulerConfig().as_dict().items() if k not in ("trained_betas", "rescale_betas_zero_snr")}
    return {**cfg, "clip_sample": False, "set_alpha_to_one": False}


TINY_UNET_CONFIG = UNetConfig()
TINY_VAE_CONFIG = VAEConfig()
TINY_TEXT_CONFIG = TextEncoderConfig()

if DEFAULT_RESOLUTION[0] // VAE_SCALE_FACTOR != TINY_UNET_CONFIG.sample_size:  # pragma: no cover
    raise AssertionError("DEFAULT_RESOLUTION and the UNet sample_size disagree")

# Words the tokenizer learns merges from: colours, garments, patterns, materials, fashion and photo
# vocabulary. `build_tokenizer(words=...)` adds a dataset's caption vocabulary on top.
FASHION_WORDS: tuple[str, ...] = (
    # colours
    "black", "white", "grey", "gray", "red", "blue", "green", "yellow", "orange", "pink", "purple",
    "brown", "beige", "cream", "ivory", "navy", "teal", "turquoise", "maroon", "burgundy", "olive",
    "khaki", "tan", "camel", "charcoal", "silver", "gold", "golden", "coral", "mint", "lavender",
    "lilac", "mustard", "rust", "taupe", "nude", "multicolour", "multicolor", "dark", "light", "pale",
    "bright", "pastel", "neon", "colour", "color",
    # garments and accessories
    "dress", "shirt", "tshirt", "blouse", "top", "tank", "camisole", "sweater", "jumper", "cardigan",
    "hoodie", "sweatshirt", "jacket", "coat", "blazer", "vest", "waistcoat", "parka", "trench",
    "trousers", "pants", "jeans", "shorts", "skirt", "leggings", "joggers", "chinos", "jumpsuit",
    "romper", "overalls", "suit", "tuxedo", "gown", "kimono", "tunic", "poncho", "cape", "shawl",
    "scarf", "hat", "cap", "beanie", "gloves", "socks", "tights", "stockings", "belt", "tie", "bow",
    "bag", "handbag", "backpack", "clutch", "tote", "shoes", "sneakers", "trainers", "boots", "sandals",
    "heels", "loafers", "flats", "slippers", "bra", "lingerie", "swimsuit", "bikini", "pyjamas",
    "robe", "uniform", "collar", "sleeve", "sleeves", "sleeveless", "cuff", "hem", "pocket", "button",
    "buttons", "zip", "zipper", "hood", "lapel", "neckline", "waist", "strap", "straps", "lace",
    # cuts and fits
    "long", "short", "mini", "midi", "maxi", "cropped", "oversized", "fitted", "slim", "loose",
    "relaxed", "tailored", "pleated", "wrap", "vneck", "crew", "neck", "turtleneck", "off",
    "shoulder", "high", "low", "rise", "wide", "leg", "straight", "skinny", "flared", "bootcut",
    # patterns
    "plain", "solid", "striped", "stripes", "checked", "check", "plaid", "tartan", "gingham",
    "houndstooth", "herringbone", "polka", "dot", "dots", "floral", "flowers", "paisley", "camouflage",
    "camo", "leopard", "zebra", "animal", "print", "printed", "graphic", "logo", "geometric",
    "abstract", "argyle", "chevron", "embroidered", "sequined", "patterned", "textured", "quilted",
    # materials
    "cotton", "linen", "wool", "cashmere", "silk", "satin", "velvet", "denim", "leather", "suede",
    "polyester", "nylon", "jersey", "knit", "knitted", "fleece", "tweed", "corduroy", "chiffon",
    "tulle", "mesh", "fur", "faux", "canvas", "rubber", "sheer", "matte", "glossy", "metallic",
    # fashion and photo words
    "fashion", "garment", "clothing", "apparel", "outfit", "model", "mannequin", "woman", "man",
    "women", "men", "person", "wearing", "worn", "standing", "walking", "posing", "front", "back",
    "side", "view", "full", "body", "closeup", "close", "detail", "studio", "photo", "photograph",
    "photography", "shot", "product", "catalog", "catalogue", "ecommerce", "packshot", "background",
    "backdrop", "lighting", "soft", "shadow", "shadows", "realistic", "real", "rendered",
    "render", "cgi", "3d", "digital", "quality", "resolution", "sharp", "focus", "natural",
    "professional", "fabric", "texture", "wrinkles", "folds", "drape", "stitching", "seam", "seams",
    "a", "an", "the", "of", "on", "in", "with", "and", "for", "at",
)  # fmt: skip

_END = "</w>"
# CLIP's pre-tokenizer regex (`[\p{L}]+`, `[\p{N}]`, `[^\s\p{L}\p{N}]+` and the contractions) in
# stdlib `re` terms; it only decides which symbol pairs the BPE learner counts, so the small
# differences from the real tokenizer cost at most a merge, never a failed encode.
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's byte -> printable character table: the 256 base symbols of byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _pieces(text: str, table: dict[int, str]) -> list[str]:
    """Pre-tokenize like CLIPTokenizer (NFC, collapse whitespace, lowercase, split, byte-map)."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    return ["".join(table[b] for b in p.encode("utf-8")) for p in _PIECES.findall(text)]


def _learn_merges(words: Iterable[str], max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair) until every
    word is one symbol or `max_merges` is reached. Deterministic for a given multiset of words."""
    table = _bytes_to_unicode()
    counts = Counter(p for w in words for p in _pieces(w, table))
    seqs: list[list[str]] = []
    freqs: list[int] = []
    for piece, f in sorted(counts.items()):
        seqs.append([*piece[:-1], piece[-1] + _END])
        freqs.append(f)

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in itertools.pairwise(seq):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        merges.append(pair)
        a, b = pair
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            seq, f = seqs[i], freqs[i]
            for p in itertools.pairwise(seq):
                pair_counts[p] -= f
                changed.add(p)
            new: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(seq[j])
                    j += 1
            seqs[i] = new
            for p in itertools.pairwise(new):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
        for p in sorted(changed):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p, None)
    return merges


def _tokenizer_files(words: Iterable[str]) -> dict[str, str]:
    """The tiny family's tokenizer: merges learned on FASHION_WORDS and `words`, in CLIP's layout."""
    return clip_tokenizer_files(_learn_merges((*FASHION_WORDS, *words)))


def clip_tokenizer_files(merges: Sequence[tuple[str, str]], **config: Any) -> dict[str, str]:
    """A CLIPTokenizer directory's files (name -> text) for BPE `merges`, in CLIP's layout (the tiny family's and
    SD 1.x's): bytes, bytes + "</w>", merge results, then <|startoftext|> and <|endoftext|> as the two highest ids;
    `config`: more tokenizer_config.json fields."""
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in [*base, *(c + _END for c in base), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(tok, len(vocab))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, **special, **config}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
        # Both the tokenizers library and the old slow CLIPTokenizer skip the first line.
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _write_files(out_dir: Path, files: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")


def write_clip_tokenizer(out_dir: Path, merges: Sequence[tuple[str, str]], **config: Any) -> Path:
    """`clip_tokenizer_files` written to `out_dir`."""
    _write_files(out_dir, clip_tokenizer_files(merges, **config))
    return out_dir


def build_tokenizer(out_dir: Path, words: Iterable[str] = ()) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) to `out_dir` and load it.

    Built locally so nothing is downloaded; `words` (e.g. a dataset's caption vocabulary) is learned
    on top of FASHION_WORDS.
    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    _write_files(out_dir, _tokenizer_files(words))
    return CLIPTokenizer.from_pretrained(out_dir, local_files_only=True)


def _component_seed(seed: int, index: int) -> int:
    # Each component gets its own stream, so changing one (e.g. the vocabulary) leaves the others' weights.
    return (seed * 1_000_003 + index) % (2**63)


def build_tiny_model(out_dir: Path, seed: int = 0, words: Iterable[str] = ()) -> Path:
    """Build and save the tiny SD-1.x-family model (seeded random init, float32, safetensors only).

    The same seed and words give byte-identical files. `out_dir` must be absent or empty, so no stale
    weights (e.g. a .bin) can sit next to the new ones. Returns `out_dir`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    tok_files = _tokenizer_files(words)
    _write_files(out_dir / "tokenizer", tok_files)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer", local_files_only=True)

    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(_component_seed(seed, 0))
            unet = UNet2DConditionModel(**TINY_UNET_CONFIG.kwargs())
            torch.manual_seed(_component_seed(seed, 1))
            vae = AutoencoderKL(**TINY_VAE_CONFIG.kwargs())
            torch.manual_seed(_component_seed(seed, 2))
            text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG.kwargs(tokenizer)))
    finally:
        torch.set_default_dtype(old_dtype)

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**scheduler_kwargs()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # transformers re-saves the tokenizer with its own extras (tokenizer.json, local-path fields);
    # keep exactly the files written above so the tokenizer is version-neutral and byte-stable.
    shutil.rmtree(out_dir / "tokenizer")
    _write_files(out_dir / "tokenizer", tok_files)
    width, height = DEFAULT_RESOLUTION
    (out_dir / DEFAULTS_FILE).write_text(json.dumps({"width": width, "height": height}) + "\n")
    return out_dir


def build_random_embedding(
    model_dir: Path, out_file: Path, token: str = "<rendered>", num_vectors: int = 75, seed: int = 0
) -> Path:
    """Write a diffusers textual-inversion file: safetensors, one key `token`, float32 [num_vectors, hidden].

    Values are random normal scaled to the std of the model's token embedding, so the vectors sit in
    the encoder's input range; `pipe.load_textual_inversion(out_file, token=token)` then expands the
    token to `token`, `token_1`, ... (75 vectors fill CLIP's context between bos and eos).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not 1 <= num_vectors <= MODEL_MAX_LENGTH - 2:
        raise ValueError(f"num_vectors must be in 1..{MODEL_MAX_LENGTH - 2}, got {num_vectors}")
    files = sorted((Path(model_dir) / "text_encoder").glob("*.safetensors"))
    weight = None
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith("token_embedding.weight")), None)  # noqa: SIM118
            if key is not None:
                weight = f.get_tensor(key).float()
                break
    if weight is None:
        raise FileNotFoundError(f"{model_dir}: no text_encoder token embedding in safetensors files")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.randn(num_vectors, weight.shape[1], generator=gen, dtype=torch.float32) * weight.std()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: emb.contiguous()}, str(out_file))
    return out_file
