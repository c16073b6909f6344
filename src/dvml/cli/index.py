"""``dvml index SOURCE -o INDEX``: a faiss gallery index with its row ids, labels and paths."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors
from dvml.retrieval.knn import IndexKind, Metric
from dvml.serve.index import IndexConfig, run

_D = IndexConfig


@app.command("index")
@handle_errors
def index_cmd(
    source: Path = typer.Argument(..., help="A run directory or a cache (indexes its --split), or a folder of "
                                            "images (needs --model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index file; its row table goes beside it as INDEX.json."),
    split: str = typer.Option(_D.split, help="Cache split to index: test or train."),
    model: Path | None = typer.Option(None, help="Embeds a folder of images: an exported .pt2/.pt/.onnx, a "
                                                 "run directory or a cache."),
    weights: Path | None = typer.Option(None, help="Backbone weights file for a run/cache extracted from one."),
    kind: IndexKind = typer.Option(_D.kind.value, help="flat = exact; ivf / hnsw = approximate (recall against "
                                                       "exact is measured and reported)."),
    metric: Metric = typer.Option(_D.metric.value, help="Distance (cosine as dvml evaluate)."),
    nlist: int | None = typer.Option(None, help="IVF lists (default about 4*sqrt(N), >= 39 items per list)."),
    nprobe: int = typer.Option(_D.nprobe, help="IVF lists visited per query (default for search)."),
    hnsw_m: int = typer.Option(_D.hnsw_m, help="HNSW links per vector."),
    ef_search: int = typer.Option(_D.ef_search, help="HNSW search beam (default for search)."),
    seed: int = typer.Option(_D.seed, help="IVF k-means seed and recall-sample seed."),
    overwrite: bool = typer.Option(_D.overwrite, "--overwrite/--no-overwrite", help="Replace an existing index."),
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
