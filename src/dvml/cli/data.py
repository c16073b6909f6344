"""``dvml data download cub|sop|cars196|inshop --out DIR`` and ``dvml data verify NAME DIR`` (see
:mod:`dvml.extract.download`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.cli.datasets import metavar, published_choice
from dvml.cli.options import one_of
from dvml.errors import DvmlError
from dvml.extract import download as D
from dvml.extract.archive import Limits
from dvml.extract.registry import published_names

#: The built-in datasets with a known source (``folder`` has none): a view of :mod:`dvml.extract.registry`; the
#: arguments accept any registered dataset with a source, checked when the command runs.
PublishedDataset = Enum("PublishedDataset", [(n, n) for n in published_names()], type=str, module=__name__)


data_app = typer.Typer(help="Download (resumable, MD5-checked, safely unpacked) and verify the benchmark datasets.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


class _ByUnit(ProgressColumn):
    """A bytes column for download/MD5 tasks, a plain count of archive members for unpacking."""

    def __init__(self, for_bytes: ProgressColumn, members: bool):
        super().__init__()
        self.for_bytes = for_bytes
        self.members = members

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            return self.for_bytes.render(task)
        if self.members:
            return Text(f"{int(task.completed):,}/{int(task.total or 0):,} members", style="progress.download")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} members/s", style="progress.data.speed")


def _progress() -> Progress:
    """Bytes, rate and ETA for downloads and checksums; members and their rate while unpacking."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), _ByUnit(DownloadColumn(), True),
                    _ByUnit(TransferSpeedColumn(), False), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console)


def _on_progress(progress: Progress):
    tasks: dict[tuple[str, str], int] = {}

    def update(stage: str, name: str, done: int, total: int | None) -> None:
        key = (stage, name)
        if key not in tasks:
            label = {"download": "download", "md5": "MD5", "extract": "unpack"}[stage]
            tasks[key] = progress.add_task(f"{label} {name}", total=total, completed=done,
                                           unit="members" if stage == "extract" else "bytes")
        else:
            progress.update(tasks[key], completed=done, total=total)

    return update


@data_app.command("download")
@handle_errors
def download_cmd(
    dataset: str = typer.Argument(..., callback=published_choice, metavar=metavar(published_names()),
                                  help="Dataset to get."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Directory for the archive(s) and the unpacked "
                                                              "dataset directory. [required]"),
    to: Path | None = typer.Option(None, "--to", hidden=True, help="Old spelling of --out."),
    url: str | None = typer.Option(None, "--url", help="A mirror of the archive, tried first (its MD5 must still be "
                                   "the published one)."),
    keep_archives: bool = typer.Option(True, "--keep-archives/--remove-archives",
                                       help="Keep the archive files after unpacking (verify can recheck them)."),
    timeout: float = typer.Option(60.0, help="Seconds without data before a connection counts as lost."),
    max_unpacked_gb: float = typer.Option(Limits.max_bytes / 1e9, help="Refuse an archive whose members unpack "
                                          "to more than this many GB (the largest dataset is about 3)."),
    max_ratio: float = typer.Option(Limits.max_ratio, help="Refuse an archive that unpacks to more than this many "
                                    "times its own size (above 64 MiB; image archives are about 1x)."),
):
    """Download, check the MD5, unpack safely and verify; prints the --root for `dvml extract`.

    Interrupted? Rerun the same command: the download resumes (HTTP Range). Cars196 and In-Shop have no
    official download: put their files in --out by hand (the command says where to get them) and run it to
    check and unpack them.
    """
    to = one_of(out, to, "--out", "--to")
    source = D.source_for(dataset)
    if not source.downloadable and not all(f.local(to) for f in source.files):
        if not (to / source.folder).exists():
            console.print(f"{dataset} has no official download any more. Get the files by hand:")
            for f in source.files:
                console.print(f"  {f.name}" + (f"  MD5 {f.md5}" if f.md5 else "  (no published MD5)"))
            console.print(f"from {source.obtain}.")
            for note in source.notes:
                console.print(f"Note: {note}.")
            console.print(f"Put them in {to}, then rerun `dvml data download {dataset} --out {to}` (checks and "
                          f"unpacks them into {to / source.folder}), or unpack them yourself and run "
                          f"`dvml data verify {dataset} DIR`.")
            raise DvmlError(f"{to}: {dataset} files not found (see above)")
    with _progress() as progress:
        root = D.download(dataset, to, url=url, progress=_on_progress(progress), timeout=timeout,
                          keep_archives=keep_archives,
                          limits=Limits(max_bytes=int(max_unpacked_gb * 1e9), max_ratio=max_ratio))
    console.print(f"{dataset} is ready: dvml extract {dataset} --root {root} --out FILE.h5",
                  soft_wrap=True)  # one unbroken line: it is meant to be copied


@data_app.command("verify")
@handle_errors
def verify_cmd(
    dataset: str = typer.Argument(..., callback=published_choice, metavar=metavar(published_names()),
                                  help="Dataset the directory should hold."),
    path: Path = typer.Argument(..., help="The dataset directory, or the --out directory of `dvml data download`."),
):
    """Check MD5s (of the archives found), structure, official counts and that every image exists."""
    with _progress() as progress:
        report = D.verify(dataset, path, progress=_on_progress(progress))
    table = Table(title=f"{dataset}: {report.root or path}", title_justify="left")
    for col in ("check", "", "detail"):
        table.add_column(col)
    for c in report.checks:
        status = "[dim]not checked[/]" if not c.checked else "[green]ok[/]" if c.ok else "[red]FAIL[/]"
        table.add_row(c.what, status, c.detail)
    console.print(table)
    if not report.ok:
        first = report.failures()[0]
        raise DvmlError(f"{path}: {dataset} does not verify ({len(report.failures())} failed check(s); "
                        f"first: {first.what}: {first.detail})")
    console.print(f"{dataset} verified: dvml extract {dataset} --root {report.root} --out FILE.h5",
                  soft_wrap=True)
