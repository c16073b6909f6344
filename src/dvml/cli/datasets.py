"""Dataset arguments read from :mod:`dvml.extract.registry` when a command runs (so a dataset registered before
then is accepted although the argument was declared earlier, and ``dvml --help`` builds no enum)."""

from __future__ import annotations

import typer

from dvml.extract.registry import dataset_names, published_names


def dataset_choice(value: str | None) -> str | None:
    """``dvml extract``'s dataset check: a registered dataset name."""
    if value is not None and value not in dataset_names():
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(dataset_names())}")
    return value


def published_choice(value: str | None) -> str | None:
    """``dvml data download|verify``'s dataset check: a registered dataset with a source."""
    if value is not None and value not in published_names():
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(published_names())} (the datasets with a "
                                 "known source)")
    return value


def metavar(names: tuple[str, ...]) -> str:
    """``<a|b|c>`` for an argument's usage line."""
    return "<" + "|".join(names) + ">"
