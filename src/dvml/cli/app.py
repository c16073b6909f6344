"""The typer application object and the few helpers every command shares.

The CLI is the only layer that prints: library code logs and raises; here options become config
dataclasses, progress bars are layered on, and :class:`~dvml.errors.DvmlError` (and ``ValueError`` from
config validation, and any ``OSError`` no writer translated: ``FILE: CAUSE``) become a one-line red message on
stderr with exit code 1, no traceback.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import typer
import typer.core
import typer.main
from rich.console import Console
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


class Entry(NamedTuple):
    """A command of ``dvml``: the module that registers it on :data:`app`, its help panel and one-line summary."""

    module: str
    panel: str
    summary: str


PIPELINE, EXPERIMENTS, SERVE, DATA = "Pipeline", "Experiments", "Use an embedding", "Data and caches"

# Every command, in the order of the pipeline. Its module is imported only when the command runs (or shows its
# own --help): `dvml --help` reads the summaries here and imports no command, torch or faiss.
COMMANDS: dict[str, Entry] = {
    "extract": Entry("dvml.cli.extract", PIPELINE, "Run a frozen backbone over a dataset once: P views of features "
                                                   "per image into an HDF5 cache."),
    "synth": Entry("dvml.cli.synth", PIPELINE, "Generate a feature cache under DVML's assumption (class centre + "
                                               "class-independent variation); no images needed."),
    "fit-heads": Entry("dvml.cli.fit_heads", PIPELINE, "Train the DVML heads on cached features (the fast path)."),
    "evaluate": Entry("dvml.cli.evaluate", PIPELINE, "Recall@K, NMI/F1, MAP@R and R-precision of a run or of raw "
                                                     "cached features."),
    "finetune": Entry("dvml.cli.finetune", PIPELINE, "Train backbone + DVML heads end to end from images (GPU)."),
    "demo": Entry("dvml.cli.demo", EXPERIMENTS, "No download, no arguments: a synthetic world, baseline vs DVML."),
    "ablate": Entry("dvml.cli.ablate", EXPERIMENTS, "Grid of losses x {baseline, DVML, noise control} x seeds on one "
                                                    "cache, with paired differences."),
    "tune": Entry("dvml.cli.tune", EXPERIMENTS, "Optuna search on classes held out from the training split."),
    "analyze": Entry("dvml.cli.analyze", EXPERIMENTS, "The paper's Table 4 evidence, how alive a run's "
                                                      "variational branch is, and whether it beats noise."),
    "report": Entry("dvml.cli.report", EXPERIMENTS, "The markdown tables of a kept results folder, regenerated from "
                    "its files (and checked against a document)."),
    "export": Entry("dvml.cli.export", SERVE, "One model file, images to embeddings (torch.export .pt2, TorchScript "
                                              "or ONNX)."),
    "index": Entry("dvml.cli.index", SERVE, "Build a faiss gallery index with row ids, labels and paths."),
    "search": Entry("dvml.cli.search", SERVE, "Top-k gallery items of query images."),
    "show": Entry("dvml.cli.show", SERVE, "An HTML page of seeded test queries and their top-k, right or wrong."),
    "data": Entry("dvml.cli.data", DATA, "Download and verify the benchmark datasets."),
    "cache": Entry("dvml.cli.cache", DATA, "Inspect and check HDF5 feature caches."),
}


def _usage_name(param) -> Callable[[], str]:
    def name() -> str:  # CACHE, [OUT], TARGETS...: the classic usage line, not typer's {cache}
        text = param.metavar if param.required else f"[{param.metavar}]"
        return text + ("..." if param.nargs != 1 else "")

    return name


def _tidy_help(command) -> None:
    """Help as a user reads it: a flag takes no value (no ``<bool>`` beside it), an argument is named in capitals
    (``CACHE``; typer would print ``{cache}`` in the usage line)."""
    for p in getattr(command, "params", []):
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        if getattr(p, "param_type_name", "") == "argument":
            if p.metavar is None:
                p.metavar = p.name.upper()
            p._usage_display_name = _usage_name(p)
    help_option = command.get_help_option  # made on first use, per command

    def get_help_option(ctx):
        option = help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
            _plain_flag(option)
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _plain_flag(param) -> None:
    """A flag is a plain boolean: give it typer's pass-through coercion, so that parsing the root's flags and
    --help (every command line does) does not import pydantic for type adapters (~0.1 s of every
    `dvml ... --help`). Typer internals: with another typer, its own (slower) path is kept."""
    try:
        from typer._coercion import PassThroughRuntimeParam

        if getattr(param, "is_flag", False) and param._runtime_param is None:
            param._runtime_param = PassThroughRuntimeParam(annotation=bool,
                                                           parameter_info=param.type_descriptor.parameter_info)
    except (ImportError, AttributeError, TypeError):
        pass


class LazyCommands(typer.core.TyperGroup):
    """The root group: lists every command of :data:`COMMANDS` from its summary and imports a command's module
    only when that command is resolved (run, or asked for its --help)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _tidy_help(self)
        for p in self.params:
            _plain_flag(p)
        for name, command in self.commands.items():  # those whose module was imported before: typer built them
            _dress(name, command)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        """As typer's, but a usage error (unknown option, bad value, missing argument) is one ``error:`` line
        under the usage, as every other dvml error is, not a boxed ``Error``."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console.print("[yellow]aborted[/]")
            sys.exit(1)
        except typer.core._click.exceptions.ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # `dvml` alone: the help was the answer
                ctx = getattr(e, "ctx", None)
                if ctx is not None:
                    err_console.print(ctx.get_usage(), highlight=False, markup=False)
                    err_console.print(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.",
                                      highlight=False, markup=False)
                err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False,
                                  soft_wrap=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        entry = COMMANDS[cmd_name]  # listed, not loaded: a stand-in with the summary (resolve_command loads it)
        stub = typer.core.TyperCommand(name=cmd_name, help=entry.summary, rich_help_panel=entry.panel)
        return stub

    def resolve_command(self, ctx, args):
        if args and args[0] in COMMANDS:
            self.load(args[0])
        elif args and not args[0].startswith("-"):  # a typo: suggest among every command, loaded or not
            import difflib

            matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
            if matches:
                ctx.fail(f"No such command {args[0]!r}. Did you mean {', '.join(map(repr, matches))}?")
        return super().resolve_command(ctx, args)

    def load(self, name: str):
        """Import the module of command ``name`` and add its click command to this group."""
        if name not in self.commands:
            importlib.import_module(COMMANDS[name].module)
            self.add_command(build_command(name), name)
        return self.commands[name]

    def load_all(self) -> dict:
        for name in COMMANDS:
            self.load(name)
        return self.commands


def build_command(name: str):
    """The click command (or group) of the command ``name`` registered on :data:`app`."""
    settings = {"pretty_exceptions_short": app.pretty_exceptions_short, "rich_markup_mode": app.rich_markup_mode}
    command = None
    for info in app.registered_commands:
        if info.name == name:
            command = typer.main.get_command_from_info(info, **settings)
    for info in app.registered_groups:
        if info.name == name:
            command = typer.main.get_group_from_info(info, suggest_commands=app.suggest_commands, **settings)
    if command is None:
        raise LookupError(f"{COMMANDS[name].module} registers no command {name!r}")
    return _dress(name, command)


def _dress(name: str, command):
    """The panel and summary of :data:`COMMANDS` on a built command, and its help tidied."""
    entry = COMMANDS.get(name)
    if entry is not None:
        command.rich_help_panel, command.short_help = entry.panel, entry.summary
    _tidy_help(command)
    return command


def root_command() -> LazyCommands:
    """The root click group with every command loaded (for tests and tools that walk all options)."""
    group = typer.main.get_command(app)
    group.load_all()
    return group


app = typer.Typer(
    name="dvml",
    cls=LazyCommands,
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
    from rich.logging import RichHandler

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
