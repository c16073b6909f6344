"""``dvml evaluate TARGET``: Recall@K, NMI/F1, MAP@R, R-precision of a run directory or a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors, make_progress
from dvml.cli.render import results_table
from dvml.evaluate import METRICS_FILE, EvalConfig, Metric, parse_ks, run

_D = EvalConfig


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    target: Path = typer.Argument(..., help="Run directory (embed its cache's test split with its heads) or an "
                                            "HDF5 feature cache (score the raw test features: the baseline)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write metrics + provenance to this file."),
    metric: Metric = typer.Option(_D.metric.value, help="Retrieval distance (cosine = L2-normalised inner "
                                                        "product)."),
    ks: str | None = typer.Option(None, help="Recall@K values, e.g. 1,2,4,8 (default: 1,2,4,8; 1,10,100,1000 "
                                             "when the cache's dataset is sop)."),
    kmeans_runs: int = typer.Option(_D.kmeans_runs, help="k-means repetitions (seeds seed, seed+1, ...) "
                                                         "averaged for NMI/F1."),
    seed: int = typer.Option(_D.seed, help="First k-means seed."),
    clustering: bool = typer.Option(_D.clustering, "--clustering/--no-clustering",
                                    help="NMI/F1 (k-means) besides the retrieval metrics."),
    gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="Force faiss onto the GPU or the CPU "
                                                              "(default: GPU when faiss supports one)."),
):
    """Score retrieval (exact FAISS kNN) and clustering (k-means) of the test split; RUN_DIR/metrics.json."""
    cfg = EvalConfig(target=target, ks=parse_ks(ks) if ks else None, metric=metric, kmeans_runs=kmeans_runs,
                     seed=seed, clustering=clustering, json_path=json_path, use_gpu=gpu)
    with make_progress("item") as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, rate="")
            progress.advance(tasks[stage], advance)

        result = run(cfg, progress=on_progress)
    title = (f"{target}: {result['n_test']:,} test items, {result['n_classes']:,} classes, {result['metric']}"
             + (f", k-means x{result['kmeans_runs']}" if result["clustering"] else ""))
    console.print(results_table(result, title=title))
    if result["clustering"]:
        console.print(f"pairwise precision {100 * result['precision']:.2f}, recall {100 * result['recall']:.2f}")
    if result.get("cache_fingerprint"):
        console.print(f"cache {result.get('cache')} (fingerprint {result['cache_fingerprint']})")
    written = [p for p in ((target / METRICS_FILE) if target.is_dir() else None, json_path) if p is not None]
    for path in written:
        console.print(f"wrote {path}")
