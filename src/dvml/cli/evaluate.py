"""``dvml evaluate TARGET``: Recall@K, NMI/F1, MAP@R, R-precision of a run directory or a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.options import SearchDevice
from dvml.cli.render import results_table, worst_table
from dvml.evaluate import METRICS_FILE, EvalConfig, Metric, parse_ks, run
from dvml.files import is_stdout

_D = EvalConfig


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    target: Path = typer.Argument(..., help="Run directory (embed its cache's test split with its heads) or an "
                                            "HDF5 feature cache (score the raw test features: the baseline)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write metrics + provenance to this file "
                                                              "('-': standard output, the table then goes to "
                                                              "standard error)."),
    metric: Metric = typer.Option(_D.metric.value, help="Retrieval distance (cosine = L2-normalised inner "
                                                        "product)."),
    ks: str | None = typer.Option(None, help="Recall@K values, e.g. 1,2,4,8 (default: 1,2,4,8; 1,10,100,1000 "
                                             "when the cache's dataset is sop; 1,10,20,30,40,50 for inshop)."),
    kmeans_runs: int = typer.Option(_D.kmeans_runs, help="k-means repetitions (seeds seed, seed+1, ...) "
                                                         "averaged for NMI/F1."),
    seed: int = typer.Option(_D.seed, help="First k-means seed."),
    clustering: bool = typer.Option(_D.clustering, "--clustering/--no-clustering",
                                    help="NMI/F1 (k-means) besides the retrieval metrics."),
    device: SearchDevice = typer.Option(SearchDevice.auto, help="Where faiss searches: auto (the GPU when this "
                                                                "faiss build has one), cpu or cuda."),
    gpu: bool | None = typer.Option(None, "--gpu/--cpu", hidden=True, help="Old spelling of --device cuda/cpu."),
    per_class: Path | None = typer.Option(None, "--per-class", help="Write per-class results to this CSV "
                                          "(class, count of queries, recall@1, map@r)."),
    worst: int = typer.Option(5, help="Show this many worst classes by Recall@1 (0: none)."),
):
    """Score retrieval (exact FAISS kNN) and clustering (k-means) of the test split; RUN_DIR/metrics.json."""
    if worst < 0:
        raise ValueError(f"--worst must be >= 0, got {worst}")
    if gpu is not None:  # the old --gpu/--cpu
        if device is not SearchDevice.auto and (device is SearchDevice.cuda) != gpu:
            raise ValueError(f"--{'gpu' if gpu else 'cpu'} is the old spelling of --device "
                             f"{'cuda' if gpu else 'cpu'}: give --device only")
        device = SearchDevice.cuda if gpu else SearchDevice.cpu
    use_gpu = {SearchDevice.auto: None, SearchDevice.cpu: False, SearchDevice.cuda: True}[device]
    if use_gpu:  # said here in the option's own words (the library checks again)
        from dvml.retrieval import knn

        try:
            knn.resolve_gpu(True)
        except ValueError as e:
            raise ValueError(f"--device cuda: {e}; pass --device cpu, or auto (the GPU is then used when faiss "
                             "has one)") from None
    cfg = EvalConfig(target=target, ks=parse_ks(ks) if ks else None, metric=metric, kmeans_runs=kmeans_runs,
                     seed=seed, clustering=clustering, json_path=json_path, use_gpu=use_gpu,
                     per_class=worst > 0, per_class_csv=per_class)
    with make_progress("item") as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, rate="")
            progress.advance(tasks[stage], advance)

        result = run(cfg, progress=on_progress)
    out = err_console if is_stdout(json_path) else console  # standard output holds only the JSON
    protocol = (f" ({result['n_query']:,} queries vs {result['n_gallery']:,} gallery)"
                if result.get("protocol") == "query/gallery" else "")
    title = (f"{target}: {result['n_test']:,} test items{protocol}, {result['n_classes']:,} classes, "
             f"{result['metric']}" + (f", k-means x{result['kmeans_runs']}" if result["clustering"] else "")
             + (" (on the gallery)" if protocol and result["clustering"] else ""))
    out.print(results_table(result, title=title))
    if worst > 0:
        out.print(worst_table(result["per_class"], worst))
    if result["clustering"]:
        out.print(f"pairwise precision {100 * result['precision']:.2f}, recall {100 * result['recall']:.2f}")
    if result.get("cache_fingerprint"):
        out.print(f"cache {result.get('cache')} (fingerprint {result['cache_fingerprint']})")
    ck = result.get("checkpoint")
    if ck:  # which checkpoint was scored (also in metrics.json): an unfinished run must not pass for a finished one
        style = "" if ck["status"] == "finished" else "[yellow]"
        out.print(f"{style}checkpoint {ck['file']}: epoch {ck['epochs_done']} of {ck['epochs']}, {ck['status']}"
                  + (f" (model of epoch {ck['epoch']}, {ck['selection']})" if ck["epoch"] != ck["epochs_done"]
                     else "") + f"; sha256 {str(ck['sha256'])[:16]}", highlight=False)
    written = [p for p in ((target / METRICS_FILE) if target.is_dir() else None, json_path, per_class)
               if p is not None and not is_stdout(p)]
    for path in written:
        out.print(f"wrote {path}")
