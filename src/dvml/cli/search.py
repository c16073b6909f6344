"""``dvml search INDEX QUERY...``: the top-k gallery items of query images, with distances, labels and paths."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.files import is_stdout
from dvml.serve.index import SearchConfig, search


@app.command("search")
@handle_errors
def search_cmd(
    index: Path = typer.Argument(..., help="Index file written by dvml index."),
    queries: list[Path] = typer.Argument(..., help="Query images or folders of images."),
    k: int = typer.Option(SearchConfig.k, "-k", help="Neighbours per query."),
    model: Path | None = typer.Option(None, help="Embed the queries with this model/run/cache instead of the one "
                                                 "recorded in the index."),
    weights: Path | None = typer.Option(None, help="Backbone weights file, when the embedder's cache needs one."),
    exclude_self: bool = typer.Option(SearchConfig.exclude_self, "--exclude-self/--no-exclude-self",
                                      help="Skip gallery rows that are the query file (as dvml evaluate excludes "
                                           "each query)."),
    nprobe: int | None = typer.Option(None, help="IVF lists visited (default: the index's)."),
    ef_search: int | None = typer.Option(None, help="HNSW beam (default: the index's)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file ('-': "
                                                               "standard output, the tables going to standard error)."),
):
    """Top-k gallery items of each query image, with distances, labels and paths."""
    res = search(SearchConfig(index=index, queries=tuple(queries), k=k, model=model, weights=weights,
                              exclude_self=exclude_self, nprobe=nprobe, ef_search=ef_search, json_path=json_path))
    out = err_console if is_stdout(json_path) else console  # standard output holds only the JSON
    for q in res["queries"]:
        table = Table(title=q["query"], title_justify="left",
                      caption=f"paths relative to {res['root']}" if res.get("root") else None, caption_justify="left")
        for col in ("rank", "distance", "label", "class", "path"):
            table.add_column(col, justify="right" if col in ("rank", "distance", "label") else "left")
        for r in q["results"]:
            table.add_row(str(r["rank"]), f"{r['distance']:.4f}", str(r["label"]), r.get("class_name") or "",
                          r["path"])
        out.print(table)
    if json_path is not None and not is_stdout(json_path):
        console.print(f"wrote {json_path}")
