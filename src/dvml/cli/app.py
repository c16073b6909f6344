"""The typer application object and the few helpers every command shares.

The CLI is the only layer that prints: library code logs and raises; here options become config
dataclasses, progress bars are layered on, and :class:`~dvml.errors.DvmlError` (and ``ValueError`` from
config validation, and any ``OSError`` no writer translated: ``FILE: CAUSE``) become a one-line red message on
stderr with exit code 1, no traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dvml import __version__
from dvml.cli.fields import flag_message
from dvml.errors import DvmlError
from dvml.files import os_error_message

app = typer.Typer(
    name="dvml",
    help=(
        "Deep Variational Metric Learning as a cached-feature pipeline: "
        "extract (or synth) -> fit-heads -> evaluate, plus ablate/demo/analyze/tune and an end-to-end "
        "finetune."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()  # results
err_console = Console(stderr=True)  # errors, logs, progress


def _version_callback(value: bool):
    if value:
        console.print(f"dvml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the dvml version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn user-input and file-system errors into ``error: <message>`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DvmlError, ValueError, OSError) as e:
            text = os_error_message(e) if isinstance(e, OSError) else flag_message(e)
            err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
            if getattr(e, "hdf5_broken", False):
                # HDF5 failed writing a file and cannot be closed or shut down cleanly (it would crash the
                # process on exit): leave now; the kernel releases the locks, the cache stays incomplete
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``412.3 img/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


def make_progress(unit: str = "it", *extra_columns: ProgressColumn) -> Progress:
    """A rich progress bar on stderr: description, bar, done/total, rate in ``unit``/s, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
