"""`generate_dataset` writes render/real pairs, captions and dataset.json to a folder atomically;
image i depends only on (seed, i), so output is byte-identical whatever the worker count."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from r2r.atomic import atomic_dir
from r2r.imageio import save_png
from r2r.training.data.captions import caption_for
from r2r.training.data.designs import sample_design
from r2r.training.data.render import render_pair

GENERATOR_VERSION = 2
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 32, 4096, 8
DOMAINS = ("rendered", "real")
SPLITS = ("train", "test")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); each side in [32, 4096] and a multiple of 8 (the VAE downsamples by 8)."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {text!r} is not WxH; write it like 256x256 or 512x384")
    w, h = (int(p) for p in parts)
    for name, side in (("width", w), ("height", h)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise ValueError(
                f"size {text!r}: {name} {side} must be a multiple of {SIDE_MULTIPLE} between "
                f"{MIN_SIDE} and {MAX_SIDE}, e.g. 256x256"
            )
    return w, h


def split_counts(count: int, test_fraction: float) -> tuple[int, int]:
    """(train, test): the last round(count * test_fraction) designs are test, at least 1 (and at
    least 1 left for training) when count >= 2 and the fraction is positive."""
    n = round(count * test_fraction)
    if test_fraction > 0 and count >= 2:
        n = min(max(n, 1), count - 1)
    return count - n, n


def _make_item(args: tuple[int, int, tuple[int, int], str]) -> tuple[int, str]:
    """Worker: sample, draw and write one pair; depends only on (seed, index)."""
    index, seed, size, folder = args
    design = sample_design(np.random.default_rng([seed, index]), size)
    rendered, real = render_pair(design, size)
    name = f"{index:06d}.png"
    for domain, image in zip(DOMAINS, (rendered, real), strict=True):
        save_png(Path(folder) / domain / name, image)
    return index, caption_for(design)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it or choose another --out")
        if not (out / "dataset.json").is_file():
            # --overwrite deletes the folder; only ever do that to a dataset this command made.
            raise FileExistsError(
                f"{out} is not empty and has no dataset.json, so it is not a dataset made by "
                "`r2r-train data`; refusing to replace it even with --overwrite. Remove it yourself "
                "or choose another --out"
            )


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def generate_dataset(
    out: str | os.PathLike[str],
    count: int,
    size: tuple[int, int],
    seed: int,
    test_fraction: float = 0.1,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `count` render/real pairs to `out` (train/ and test/, each rendered/ and real/).

    Built in a sibling `out.partial-*` folder and renamed into place at the end, so an interrupted
    run never leaves a half dataset at `out`. Output is byte-identical for the same arguments,
    whatever `workers` is.
    """
    from tqdm import tqdm

    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count {count!r} must be a positive integer")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative integer")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction {test_fraction!r} must be in [0, 1), e.g. 0.1")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers {workers!r} must be a positive integer")
    size = parse_size(f"{size[0]}x{size[1]}")
    out = Path(out)
    _check_out_dir(out, overwrite)

    n_train, n_test = split_counts(count, test_fraction)
    with atomic_dir(out) as partial:
        for split in SPLITS:
            for domain in DOMAINS:
                (partial / split / domain).mkdir(parents=True)
        tasks = [(i, int(seed), size, str(partial / ("train" if i < n_train else "test"))) for i in range(count)]
        captions: list[str] = [""] * count
        with tqdm(total=count, desc="data", unit="pair", disable=not progress) as bar:
            if workers == 1:
                results: Iterator[tuple[int, str]] = map(_make_item, tasks)
                for i, caption in results:
                    captions[i] = caption
                    bar.update()
            else:
                # spawn: safe even when the parent has threads (torch, tokenizers) running
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    chunk = max(1, min(16, count // (workers * 8)))
                    for i, caption in pool.imap_unordered(_make_item, tasks, chunksize=chunk):
                        captions[i] = caption
                        bar.update()
        for split, indices in (("train", range(n_train)), ("test", range(n_train, count))):
            rows = [{"file_name": f"{i:06d}.png", "text": captions[i]} for i in indices]
            for domain in DOMAINS:
                _write_jsonl(partial / split / domain / "metadata.jsonl", rows)
        info = {
            "generator": "r2r.training.data",
            "generator_version": GENERATOR_VERSION,
            "count": count,
            "size": list(size),
            "seed": int(seed),
            "test_fraction": test_fraction,
            "splits": {"train": n_train, "test": n_test},
            "layout": "{split}/{rendered,real}/{index:06d}.png + metadata.jsonl (file_name, text)",
        }
        (partial / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _check_out_dir(out, overwrite)  # someone may have filled it meanwhile; the folder replaces `out` after this
    return out
