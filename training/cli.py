"""`r2r-train`: the training-stage commands (dataset generation now; fine-tuning steps join the group)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def main() -> None:
    """FashionR2R training tools: build datasets and train the rendered-to-real models."""


def _size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """Parse --size early so a typo fails before any work starts."""
    from r2r.training.data import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@main.command("data")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Dataset folder to create (train/ and test/, each with rendered/ and real/).",
)
@click.option("--count", required=True, type=click.IntRange(min=1), help="Number of designs (pairs).")
@click.option("--size", default="256x256", show_default=True, callback=_size, help="Image size WxH.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Dataset seed.")
@click.option(
    "--test-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Share of designs (the last ones) held out as paired test data.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def data(
    out: Path, count: int, size: tuple[int, int], seed: int, test_fraction: float, workers: int, overwrite: bool
) -> None:
    """Generate the procedural render/real garment dataset.

    Same arguments give byte-identical files, whatever --workers is; the result appears at --out
    only once complete.
    """
    from r2r.training.data import generate_dataset, split_counts

    try:
        path = generate_dataset(
            out, count, size, seed, test_fraction=test_fraction, workers=workers, overwrite=overwrite
        )
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from exc
    n_train, n_test = split_counts(count, test_fraction)
    click.echo(f"wrote {count} pairs ({n_train} train, {n_test} test) of {size[0]}x{size[1]} to {path}")
