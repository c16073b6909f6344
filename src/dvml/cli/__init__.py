"""Command-line interface: ``dvml <command>``. One thin module per command registers it on ``app``.

Shared pieces: :mod:`dvml.cli.app` (the typer app, error handling, progress bars), :mod:`dvml.cli.options`
(options used by several commands), :mod:`dvml.cli.render` (tables and lines several commands print).

A command's module is imported when the command runs or shows its help, not with this package (``dvml --help``
imports no torch): a new command is a module that registers itself on ``app`` plus one entry in
:data:`dvml.cli.app.COMMANDS`.
"""

from dvml.cli.app import COMMANDS, app, root_command


def main() -> None:
    app()


__all__ = ["COMMANDS", "app", "main", "root_command"]
