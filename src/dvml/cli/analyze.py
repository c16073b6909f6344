"""``dvml analyze RUN_DIR``: the paper's Table 4 evidence (see :mod:`dvml.experiments.analyze`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.experiments.analyze import AnalyzeConfig

_D = AnalyzeConfig  # option defaults are the config dataclass defaults


@app.command("analyze")
@handle_errors
def analyze_cmd(
    target: Path = typer.Argument(..., help="Run directory (or a feature cache: raw features only)."),
    baseline: Path | None = typer.Option(None, "--baseline", "-b",
                                         help="Run directory to compare with (e.g. the same loss without DVML)."),
    raw: bool = typer.Option(_D.raw, "--raw/--no-raw", help="Also analyse the raw backbone features."),
    splits: str = typer.Option(",".join(_D.splits), help="Splits to analyse (centre view of each image)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default RUN_DIR/analysis)."),
    normalize: bool = typer.Option(_D.normalize, "--normalize/--no-normalize",
                                   help="L2-normalise embeddings first (retrieval compares them by cosine)."),
    min_class_size: int = typer.Option(_D.min_class_size,
                                      help="Classes with fewer samples are left out of the KS test."),
    plots: bool = typer.Option(_D.plots, "--plots/--no-plots", help="Write PCA/t-SNE/p-value PNGs."),
    tsne: bool = typer.Option(_D.tsne, "--tsne/--no-tsne", help="Include the t-SNE plots (the slow part)."),
    plot_classes: int = typer.Option(_D.plot_classes, help="Classes shown in the plots (seeded random choice)."),
    plot_points: int = typer.Option(_D.plot_points, help="At most this many points per plot (t-SNE is slow)."),
    tsne_iter: int = typer.Option(_D.tsne_iter, help="t-SNE iterations (>= 250)."),
    seed: int = typer.Option(_D.seed, help="Seed of the plot subsample and t-SNE."),
):
    """The paper's Table 4 evidence: KS p-values of central features and average relative deviation, plots."""
    from dvml.experiments import analyze

    cfg = analyze.AnalyzeConfig(target=target, baseline=baseline, raw=raw,
                                splits=tuple(s.strip() for s in splits.split(",") if s.strip()), out=out,
                                normalize=normalize, min_class_size=min_class_size, plots=plots, tsne=tsne,
                                plot_classes=plot_classes, plot_points=plot_points, tsne_iter=tsne_iter, seed=seed)
    with err_console.status("analyzing") as status:
        result = analyze.run(cfg, progress=lambda msg: status.update(f"analyzing: {msg}"))
    t = Table(title="Table 4: central features (embedding minus its class mean)", title_justify="left",
              caption="KS p: per class, mean over dimensions of the KS p-value against a fitted normal; mean ± std "
                      "over classes. rel. dev.: mean over classes of mean ||z - m_c|| / ||m_c||. In %.",
              caption_justify="left")
    for col in ("split", "embedding", "KS p", "classes", "rel. dev."):
        t.add_column(col, justify="left" if col in ("split", "embedding") else "right")
    for split, per in result["splits"].items():
        for name, r in per.items():
            src = result["sources"].get(name, {})
            label = name if name == "raw" else f"{name}: {src.get('loss')}{'+DVML' if src.get('dvml') else ''}"
            ks, rd = r["ks"], r["relative_deviation"]
            std = "" if ks["std"] is None or math.isnan(ks["std"]) else f" ± {100 * ks['std']:.1f}"
            t.add_row(split, label, f"{100 * ks['mean']:.1f}{std}", str(ks["n_classes"]), f"{100 * rd['mean']:.1f}")
    console.print(t)
    console.print(f"wrote {Path(result['out']) / analyze.ANALYSIS_FILE}" +
                  (f" and {len(result['plots'])} plots" if result["plots"] else ""))
