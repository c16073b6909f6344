"""``dvml show TARGET... -o retrievals.html``: seeded test queries and their top-k, correct/wrong marked."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors
from dvml.retrieval.knn import Metric
from dvml.serve.show import ShowConfig, run

_D = ShowConfig


@app.command("show")
@handle_errors
def show_cmd(
    targets: list[Path] = typer.Argument(..., help="Run directories and/or caches (raw features) over one test "
                                                   "split; each gets a row under every query."),
    out: Path = typer.Option(..., "--out", "-o", help="retrievals.html (static page + _files/ thumbnails) or .png."),
    root: Path | None = typer.Option(None, help="Dataset root the image paths are relative to (default: the one "
                                                "recorded in the cache)."),
    queries: int = typer.Option(_D.queries, help="Number of random test queries."),
    k: int = typer.Option(_D.k, "-k", help="Neighbours shown per query."),
    seed: int = typer.Option(_D.seed, help="Seed of the query draw (same seed, same queries)."),
    metric: Metric = typer.Option(_D.metric.value, help="Distance (cosine as dvml evaluate)."),
    thumb: int = typer.Option(_D.thumb, help="Thumbnail size in pixels."),
    overwrite: bool = typer.Option(_D.overwrite, "--overwrite/--no-overwrite", help="Replace an existing output."),
):
    """Draw N seeded test queries with their top-k, each marked correct or wrong, with class names."""
    res = run(ShowConfig(targets=tuple(targets), out=out, root=root, queries=queries, k=k, seed=seed, metric=metric,
                         thumb=thumb, overwrite=overwrite))
    for t in res["targets"]:
        p = next(v for key, v in t.items() if key.startswith("precision@"))
        console.print(f"{t['target']}: precision@{res['k']} {p:.3f}, Recall@1 {t['recall@1']:.3f} on "
                      f"{len(res['queries'])} queries")
    console.print(f"wrote {res['out']}")
