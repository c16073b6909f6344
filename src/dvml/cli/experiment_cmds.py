"""``dvml ablate | demo | analyze | tune``: experiments built on fit-heads and evaluate.

Thin layer: options -> config dataclasses (:mod:`dvml.heads.ablate`, :mod:`dvml.demo`,
:mod:`dvml.evaluate.analyze`, :mod:`dvml.heads.tune`); the libraries report through callbacks and this
module renders them (a rich live table for ablations) and prints the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from pathlib import Path

import typer
from rich.live import Live
from rich.table import Table

from dvml.cli.app import app, console, err_console, handle_errors

# --------------------------------------------------------------------------------------------------
# shared fit options


def _fit_defaults():
    from dvml.heads.config import FitConfig

    return {f.name: f.default for f in dataclasses.fields(FitConfig)}


_FD = _fit_defaults()

_FIT_HELP = "Fit option shared by every run (default: fit-heads' default {})."


def _parse_set(items: list[str] | None) -> dict:
    """``--set key=value`` pairs -> FitConfig overrides; values parsed as JSON when they parse
    (numbers, true/false, lists), ``a,b,c`` as a list of numbers, else kept as strings."""
    from dvml.heads.config import FitConfig

    names = {f.name for f in dataclasses.fields(FitConfig)}
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ValueError(f"--set {key}: not a fit option; known: {', '.join(sorted(names))}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            if "," in value:
                try:
                    parsed = [float(v) for v in value.split(",")]
                except ValueError:
                    parsed = value
            else:
                parsed = value
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _fit_overrides(**opts) -> dict:
    """Options left at None are not passed (fit-heads' defaults apply)."""
    out = {}
    for k, v in opts.items():
        if v is None:
            continue
        out[k] = v.value if hasattr(v, "value") and not isinstance(v, int | float | str) else v
    return out


# --------------------------------------------------------------------------------------------------
# rendering


def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


class _AblationView:
    """State of a running ablation rendered as a rich table (one row per cell)."""

    def __init__(self):
        self.cells: list = []
        self.status: dict = {}
        self.rows: dict = {}
        self.started: dict = {}
        self.last_record: dict = {}

    def __call__(self, event) -> None:
        name = event.cell.name if event.cell is not None else None
        if event.kind == "start":
            self.cells = list(event.cells)
            self.status = {c.name: "[dim]queued[/]" for c in self.cells}
        elif event.kind == "cell_start":
            self.status[name] = "[yellow]fitting[/]"
            self.started[name] = time.perf_counter()
        elif event.kind == "epoch":
            info = event.info or {}
            ep, total = info.get("epoch"), info.get("epochs")
            text = "[yellow]fitting[/]"
            if ep is not None:
                text = f"[yellow]epoch {int(ep)}{f'/{total}' if total else ''}[/]"
            if info.get("kind") == "epoch":
                self.last_record[name] = info
            rec = self.last_record.get(name, {})
            if isinstance(rec.get("total"), int | float):
                text += f" loss {rec['total']:.3g}"
            if isinstance(rec.get("test_recall@1"), int | float):
                text += f" (watch: test R@1 {100 * rec['test_recall@1']:.1f})"
            self.status[name] = text
        elif event.kind in ("cell_done", "cell_skipped"):
            self.status[name] = "[green]done[/]" if event.kind == "cell_done" else "[cyan]done before[/]"
            self.rows[name] = event.row

    def table(self) -> Table:
        t = Table(title="ablation", title_justify="left")
        for col in ("run", "status", "R@1", "NMI", "MAP@R", "fit s"):
            t.add_column(col, justify="left" if col in ("run", "status") else "right")
        for c in self.cells:
            r = self.rows.get(c.name) or {}
            secs = r.get("fit_seconds")
            if secs is None and c.name in self.started and c.name not in self.rows:
                secs = time.perf_counter() - self.started[c.name]
            t.add_row(c.name, self.status.get(c.name, ""), _pct(r.get("recall@1")), _pct(r.get("nmi")),
                      _pct(r.get("map@r")), "" if secs is None else f"{secs:.1f}")
        return t


def summary_tables(summary: dict, *, title: str) -> list[Table]:
    """One table per loss: metric rows; baseline and DVML as mean ± std (%) over seeds, and
    Δ = DVML − baseline paired by seed with its t-interval (green/red when the interval excludes 0)."""
    from dvml.heads.stats import MeanStd, PairedDiff

    metrics = [m for m in summary["metrics"] if m not in ("precision", "recall")]
    c = int(round(summary["confidence"] * 100))
    tables = []
    for loss, e in summary["losses"].items():
        n = e["n_seeds"]
        t = Table(title=f"{title}: {loss}", title_justify="left")
        t.add_column("metric (%)")
        t.add_column(f"baseline (n={n['baseline']})", justify="right")
        t.add_column(f"DVML (n={n['DVML']})", justify="right")
        t.add_column(f"Δ DVML−base [{c}% CI]", justify="right")
        for m in metrics:
            row = e["metrics"][m]
            cells = [MeanStd(**row[k]).format() if row[k] else "—" for k in ("baseline", "DVML")]
            d = row["diff"]
            if d is None:
                diff = "—"
            else:
                pd = PairedDiff(**d)
                style = ("green" if pd.mean > 0 else "red") if pd.significant else ""
                diff = f"[{style}]{pd.format()}[/]" if style else pd.format()
            name = m.replace("recall@", "R@").replace("r_precision", "R-prec").replace("map@r", "MAP@R")
            t.add_row(name.upper() if name in ("nmi", "f1") else name, *cells, diff)
        tables.append(t)
    return tables


def _print_ablation_result(result: dict, title: str) -> None:
    for table in summary_tables(result, title=title):
        console.print(table)
    out = Path(result["out"])
    console.print(f"results: {out / 'results.csv'}  summary: {out / 'summary.md'}  chart: {out / 'ablation.png'}")


def _run_ablation(fn, *args, **kwargs) -> dict:
    import logging

    # the live table shows each cell; the per-fit/per-evaluation INFO lines would only scroll it (kept with -v).
    # Levels are restored afterwards: the process (e.g. a test session) may go on to other commands.
    quiet = [logging.getLogger(n) for n in ("dvml.heads.train", "dvml.evaluate.core")]
    saved = [q.level for q in quiet]
    if logging.getLogger().level > logging.DEBUG:
        for q in quiet:
            q.setLevel(logging.WARNING)
    view = _AblationView()
    try:
        with Live(view.table(), console=err_console, refresh_per_second=4, transient=False) as live:
            last = [0.0]

            def cb(event):
                view(event)
                now = time.perf_counter()
                # per-step events can come thousands of times a second on a GPU: redraw at most 10 times a second
                if event.kind != "epoch" or now - last[0] > 0.1:
                    last[0] = now
                    live.update(view.table())

            return fn(*args, callback=cb, **kwargs)
    finally:
        for q, level in zip(quiet, saved, strict=True):
            q.setLevel(level)


# --------------------------------------------------------------------------------------------------
# commands


@app.command("ablate")
@handle_errors
def ablate_cmd(
    cache: Path = typer.Argument(..., help="HDF5 feature cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (rerun the same command to resume)."),
    losses: str = typer.Option("triplet,npair", help="Comma-separated metric losses (any fit-heads --loss)."),
    seeds: int = typer.Option(3, help="Number of seeds per (loss, method): 0..N-1 from --first-seed."),
    first_seed: int = typer.Option(0, help="First seed."),
    methods: str = typer.Option("base,dvml", help="Which methods: base (--no-dvml), dvml, or both."),
    epochs: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["epochs"])),
    batch_size: int | None = typer.Option(None, help="Fit option (default: 120 for triplet, 128 otherwise)."),
    lr: float | None = typer.Option(None, help=_FIT_HELP.format(_FD["lr"])),
    embedding_size: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["embedding_size"])),
    samples: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["samples"]) + " (T)"),
    phase2_epoch: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["phase2_epoch"])),
    kl_warmup_epochs: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["kl_warmup_epochs"])),
    eval_every: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["eval_every"])),
    device: str | None = typer.Option(None, help="Fit option: auto, cpu or cuda (default auto)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Any other fit option as KEY=VALUE (repeatable), "
                                                               "e.g. --set lambdas_phase2=0.8,1,0.2,0.8 or --set "
                                                               "gamma=0.3 (a loss parameter must apply to every "
                                                               "loss of --losses)."),
    no_clustering: bool = typer.Option(False, "--no-clustering", help="Skip NMI/F1 (k-means)."),
):
    """Grid of losses x {baseline, DVML} x seeds on one cache: results.csv, summary.md, chart, live table."""
    from dvml.heads import ablate

    modes = {m.strip() for m in methods.split(",") if m.strip()}
    if not modes or modes - {"base", "dvml"}:
        raise ValueError(f"--methods must be base, dvml or base,dvml; got {methods!r}")
    fit = {**_fit_overrides(epochs=epochs, batch_size=batch_size, lr=lr, embedding_size=embedding_size,
                            samples=samples, phase2_epoch=phase2_epoch, kl_warmup_epochs=kl_warmup_epochs,
                            eval_every=eval_every, device=device), **_parse_set(set_)}
    cfg = ablate.AblateConfig(cache=cache, out=out, losses=tuple(losses.split(",")),
                              seeds=tuple(range(first_seed, first_seed + seeds)),
                              dvml_modes=tuple(m == "dvml" for m in ("base", "dvml") if m in modes), fit=fit,
                              clustering=not no_clustering)
    result = _run_ablation(ablate.run, cfg)
    _print_ablation_result(result, title=cache.name)


@app.command("demo")
@handle_errors
def demo_cmd(
    out: Path = typer.Option(Path("dvml-demo"), "--out", "-o", help="Directory for the world, runs and tables."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run (numbers mean little)."),
    device: str | None = typer.Option(None, help="Fit device: auto, cpu or cuda (default auto)."),
):
    """No download, no arguments: a synth world, triplet and N-pair with and without DVML, 2 seeds."""
    from dvml import demo

    cfg = demo.DemoConfig(out=out, quick=quick, fit=_fit_overrides(device=device))
    s = cfg.size
    err_console.print(f"[bold]dvml demo[/]: synth world of {s.world.n_classes} classes x {s.world.images_per_class} "
                      f"images ({s.world.n_classes // 2} unseen test classes), losses {', '.join(s.losses)}, "
                      f"baseline vs DVML, {len(s.seeds)} seeds, {s.fit.get('epochs')} epochs; output in {out}")
    t0 = time.perf_counter()
    result = _run_ablation(demo.run, cfg)
    _print_ablation_result(result, title="dvml demo (unseen test classes)")
    raw = result["raw"]
    console.print(f"for reference, the raw features without training: R@1 {100 * raw['recall@1']:.1f}, "
                  f"MAP@R {100 * raw['map@r']:.1f}")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s; everything is in {out}")


@app.command("analyze")
@handle_errors
def analyze_cmd(
    target: Path = typer.Argument(..., help="Run directory (or a feature cache: raw features only)."),
    baseline: Path | None = typer.Option(None, "--baseline", "-b",
                                         help="Run directory to compare with (e.g. the same loss without DVML)."),
    raw: bool = typer.Option(True, "--raw/--no-raw", help="Also analyse the raw backbone features."),
    splits: str = typer.Option("train,test", help="Splits to analyse (centre view of each image)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default RUN_DIR/analysis)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                   help="L2-normalise embeddings first (retrieval compares them by cosine)."),
    min_class_size: int = typer.Option(5, help="Classes with fewer samples are left out of the KS test."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PCA/t-SNE/p-value PNGs."),
    tsne: bool = typer.Option(True, "--tsne/--no-tsne", help="Include the t-SNE plots (the slow part)."),
    plot_classes: int = typer.Option(20, help="Classes shown in the plots (seeded random choice)."),
    plot_points: int = typer.Option(500, help="At most this many points per plot (t-SNE is slow)."),
    tsne_iter: int = typer.Option(500, help="t-SNE iterations (>= 250)."),
    seed: int = typer.Option(0, help="Seed of the plot subsample and t-SNE."),
):
    """The paper's Table 4 evidence: KS p-values of central features and average relative deviation, plots."""
    from dvml.evaluate import analyze

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


@app.command("tune")
@handle_errors
def tune_cmd(
    cache: Path = typer.Argument(..., help="HDF5 feature cache (only its training split is read)."),
    loss: str = typer.Option("triplet", help="Metric loss (any fit-heads --loss)."),
    trials: int = typer.Option(20, help="Finished trials the study should reach (continues an existing study)."),
    out: Path = typer.Option(Path("dvml-tune"), "--out", "-o", help="Output directory."),
    storage: str | None = typer.Option(None, help="Optuna storage URL (default sqlite:///OUT/optuna.db); give "
                                                  "several machines the same RDB URL to share one study."),
    study_name: str | None = typer.Option(None, help="Study name (default dvml-<loss>-<dvml|base>-<cache>-s<seed>)."),
    no_dvml: bool = typer.Option(False, "--no-dvml", help="Tune the baseline (no λ/T to search)."),
    objective: str = typer.Option("recall@1", help="recall@1 or map@r on the held-out validation classes."),
    val_fraction: float = typer.Option(0.25, help="Share of TRAINING classes held out for validation."),
    search: str | None = typer.Option(None, help="Comma-separated subset of: lr, margin, gamma, lambda1..lambda4, "
                                                 "samples, embedding_size (default all that apply)."),
    epochs: int | None = typer.Option(None, help=_FIT_HELP.format(_FD["epochs"])),
    batch_size: int | None = typer.Option(None, help="Fit option (default: 120 for triplet, 128 otherwise)."),
    device: str | None = typer.Option(None, help="Fit device: auto, cpu or cuda."),
    set_: list[str] | None = typer.Option(None, "--set", help="Fixed fit option KEY=VALUE (repeatable)."),
    seed: int = typer.Option(0, help="Seed of the class split, the sampler and each fit."),
    timeout: float | None = typer.Option(None, help="Stop this process after this many seconds."),
    keep_runs: bool = typer.Option(False, help="Keep every trial's run directory."),
):
    """Optuna search validated on classes held out from the training split (never the test classes)."""
    from dvml.heads import tune

    fit = {**_fit_overrides(epochs=epochs, batch_size=batch_size, device=device), **_parse_set(set_)}
    cfg = tune.TuneConfig(cache=cache, loss=loss, dvml=not no_dvml, trials=trials, out=out, storage=storage,
                          study_name=study_name, val_fraction=val_fraction, objective=objective, fit=fit,
                          search=None if search is None else tuple(s.strip() for s in search.split(",")),
                          seed=seed, timeout=timeout, keep_runs=keep_runs)

    def on_trial(t: dict) -> None:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        err_console.print(f"trial {t['number']}: {objective} {100 * t['value']:.2f} (best {100 * t['best_value']:.2f}) "
                          f"[{t['n_complete']}/{t['target']}] {t['seconds']:.1f}s  {params}", highlight=False)

    result = tune.run(cfg, callback=on_trial)
    best = result["best"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    console.print(f"best trial {best['number']}: validation {objective} {100 * best['value']:.2f}% with {params}")
    console.print(f"wrote {result['best_config_file']} (use: dvml fit-heads {cache} --config "
                  f"{result['best_config_file']} --out RUN_DIR) and {Path(cfg.out) / tune.SUMMARY_FILE}")


_ = typing  # typer resolves the annotations above at runtime
