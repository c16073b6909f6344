"""Command-line interface: ``dvml <command>``. One thin module per command registers it on ``app``.

Shared pieces: :mod:`dvml.cli.app` (the typer app, error handling, progress bars), :mod:`dvml.cli.options`
(options used by several commands), :mod:`dvml.cli.render` (tables and lines several commands print).
"""

from dvml.cli import (  # noqa: F401  (register the commands, in the order of the pipeline)
    ablate,
    analyze,
    cache,
    data,
    demo,
    evaluate,
    export,
    extract,
    finetune,
    fit_heads,
    index,
    report,
    search,
    show,
    synth,
    tune,
)
from dvml.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
