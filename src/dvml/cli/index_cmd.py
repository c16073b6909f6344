"""``dvml index SOURCE -o INDEX`` and ``dvml search INDEX QUERY...``: a faiss gallery and its top-k."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dvml.cli.app import app, console, handle_errors
from dvml.evaluate.knn import IndexKind, Metric
from dvml.serve.index import IndexConfig, SearchConfig, run, search

_D = IndexConfig


@app.command("index")
@handle_errors
def index_cmd(
    source: Path = typer.Argument(..., help="A run directory or a cache (indexes its --split), or a folder of "
                                            "images (needs --model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index file; its row table goes beside it as INDEX.json."),
    split: str = typer.Option(_D.split, help="Cache split to index: test or train."),
    model: Path | None = typer.Option(None, help="Embeds a folder of images: an exported .pt/.onnx, a run "
                                                 "directory or a cache."),
    weights: Path | None = typer.Option(None, help="Backbone weights file for a run/cache extracted from one."),
    kind: IndexKind = typer.Option(_D.kind.value, help="flat = exact; ivf / hnsw = approximate (recall against "
                                                       "exact is measured and reported)."),
    metric: Metric = typer.Option(_D.metric.value, help="Distance (cosine as dvml evaluate)."),
    nlist: int | None = typer.Option(None, help="IVF lists (default about 4*sqrt(N), >= 39 items per list)."),
    nprobe: int = typer.Option(_D.nprobe, help="IVF lists visited per query (default for search)."),
    hnsw_m: int = typer.Option(_D.hnsw_m, help="HNSW links per vector."),
    ef_search: int = typer.Option(_D.ef_search, help="HNSW search beam (default for search)."),
    seed: int = typer.Option(_D.seed, help="IVF k-means seed and recall-sample seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index."),
):
    """Build a gallery index with its row ids, labels and paths."""
    meta = run(IndexConfig(source=source, out=out, split=split, model=model, weights=weights, kind=kind,
                           metric=metric, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, seed=seed,
                           overwrite=overwrite))
    console.print(f"wrote {out} and {out.name}.json: {meta['n']:,} x {meta['dim']} ({meta['kind']}, {meta['metric']})")
    r = meta.get("recall_vs_exact")
    if r:
        console.print(f"recall@{r['k']} of the exact neighbours: {r['recall']:.4f} ({r['queries']:,} gallery rows as "
                      "queries, each excluding itself)")


@app.command("search")
@handle_errors
def search_cmd(
    index: Path = typer.Argument(..., help="Index file written by dvml index."),
    queries: list[Path] = typer.Argument(..., help="Query images or folders of images."),
    k: int = typer.Option(5, "-k", help="Neighbours per query."),
    model: Path | None = typer.Option(None, help="Embed the queries with this model/run/cache instead of the one "
                                                 "recorded in the index."),
    weights: Path | None = typer.Option(None, help="Backbone weights file, when the embedder's cache needs one."),
    exclude_self: bool = typer.Option(False, "--exclude-self", help="Skip gallery rows that are the query file "
                                                                    "(as dvml evaluate excludes each query)."),
    nprobe: int | None = typer.Option(None, help="IVF lists visited (default: the index's)."),
    ef_search: int | None = typer.Option(None, help="HNSW beam (default: the index's)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """Top-k gallery items of each query image, with distances, labels and paths."""
    res = search(SearchConfig(index=index, queries=tuple(queries), k=k, model=model, weights=weights,
                              exclude_self=exclude_self, nprobe=nprobe, ef_search=ef_search, json_path=json_path))
    for q in res["queries"]:
        table = Table(title=q["query"], title_justify="left",
                      caption=f"paths relative to {res['root']}" if res.get("root") else None, caption_justify="left")
        for col in ("rank", "distance", "label", "class", "path"):
            table.add_column(col, justify="right" if col in ("rank", "distance", "label") else "left")
        for r in q["results"]:
            table.add_row(str(r["rank"]), f"{r['distance']:.4f}", str(r["label"]), r.get("class_name") or "",
                          r["path"])
        console.print(table)
    if json_path is not None:
        console.print(f"wrote {json_path}")
