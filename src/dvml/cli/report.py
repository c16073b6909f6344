"""``dvml report DIR...``: the markdown tables of kept results directories (see :mod:`dvml.experiments.report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, err_console, handle_errors


@app.command("report")
@handle_errors
def report_cmd(
    dirs: list[Path] | None = typer.Argument(None, help="Kept results directories (results/<name>: results.csv, "
                                                       "command.txt, provenance.json)."),
    update: Path | None = typer.Option(None, "--update", help="Rewrite this document's blocks for DIRS (between "
                                                              "<!-- dvml report DIR --> and <!-- /dvml report -->; "
                                                              "a missing block is appended) instead of printing."),
    check: Path | None = typer.Option(None, "--check", help="Exit 1 when a block of this document no longer "
                                                            "matches what its directory renders (paths relative "
                                                            "to the current directory)."),
):
    """Render the result tables of kept results directories as markdown: every method's mean ± std over seeds and
    the paired DVML − baseline and DVML − noise differences with 95% t-intervals."""
    from dvml.experiments import report

    if check is not None:
        stale = report.stale_blocks(check)
        if stale:
            err_console.print(f"{check}: out of date for {', '.join(stale)}; run dvml report {' '.join(stale)} "
                              f"--update {check}")
            raise typer.Exit(1)
        console.print(f"{check}: every report block matches its results")
        return
    if not dirs:
        raise ValueError("give at least one results directory (or --check DOC)")
    if update is not None:
        changed = report.update_document(update, dirs)
        console.print(f"{update}: {'updated ' + ', '.join(changed) if changed else 'already up to date'}")
        return
    for d in dirs:
        console.print(report.render(d), markup=False, highlight=False, soft_wrap=True)
