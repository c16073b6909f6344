"""``dvml cache info|validate``: inspect a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dvml.cache import fingerprint, read_info, validate
from dvml.cache import schema as S
from dvml.cli.app import app, console, handle_errors

cache_app = typer.Typer(help="Inspect and check HDF5 feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@cache_app.command("info")
@handle_errors
def info_cmd(
    file: Path = typer.Argument(..., help="HDF5 feature cache."),
    fingerprint_: bool = typer.Option(True, "--fingerprint/--no-fingerprint",
                                      help="Hash the contents (reads the whole file)."),
):
    """Summarise a cache: dataset, backbone, weights, views, rows/classes per split, dtype, size."""
    info = read_info(file, require_complete=False)
    t = Table(title=str(file), show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("dataset", info.dataset)
    t.add_row("backbone", info.backbone)
    t.add_row("weights", info.weights)
    t.add_row("feature_dim", str(info.feature_dim))
    if info.preprocess:
        pre = info.preprocess
        rgb = {k: ", ".join(f"{v:.4g}" for v in pre.get(k, [])) for k in ("mean", "std")}
        t.add_row("preprocess", f"resize {pre.get('resize')} ({pre.get('interpolation')}), crop {pre.get('crop')}, "
                                f"mean ({rgb['mean']}), std ({rgb['std']})")
    t.add_row("views", f"{len(info.views)}: " + ", ".join(info.views[:4]) + (" ..." if len(info.views) > 4 else ""))
    for split in S.SPLITS:
        s = info.splits[split]
        t.add_row(split, f"{s.n:,} images x {s.views} views, {s.n_classes:,} classes, {s.dtype}"
                         + (", paths" if s.has_paths else ""))
        if s.n_query is not None:
            t.add_row("", f"{s.n_query:,} queries, {s.n_gallery:,} gallery (query/gallery protocol)")
    t.add_row("size on disk", _human(info.size_bytes))
    t.add_row("complete", "[green]yes[/]" if info.complete else "[red]no (resumable)[/]")
    t.add_row("schema / dvml", f"v{info.schema_version} / {info.dvml_version}")
    if info.extra.get("skipped"):
        t.add_row("skipped files", str(len(info.extra["skipped"])))
    if fingerprint_ and info.complete:
        t.add_row("fingerprint", fingerprint(file))
    console.print(t)


@cache_app.command("validate")
@handle_errors
def validate_cmd(file: Path = typer.Argument(..., help="HDF5 feature cache.")):
    """Fully check a cache (structure, completeness, disjoint classes, finite and non-zero values); exit 1 if bad.

    Some rows zero in every view are a warning; a split of only such rows is an error."""
    info = validate(file)
    console.print(f"[green]ok[/] {file}: {info.splits['train'].n:,} train / {info.splits['test'].n:,} "
                  f"test images, fingerprint {fingerprint(file)}")
