"""``dvml tune CACHE``: Optuna search on held-out training classes (see :mod:`dvml.experiments.tune`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.cli.bind import bind, from_command_line, merge_set, parse_set
from dvml.cli.options import TuneObjective, choice_value, fit_overrides
from dvml.experiments.tune import TuneConfig
from dvml.heads.config import FitConfig
from dvml.losses import LossName

_D = TuneConfig  # option defaults are the config dataclass defaults


#: The fit options tune offers as flags (any other: --set), each as fit-heads' (dvml.cli.bind, passthrough).
TUNE_FIT_FIELDS = ("epochs", "batch_size", "device")


@app.command("tune")
@handle_errors
@bind(FitConfig, TUNE_FIT_FIELDS, passthrough=True)
def tune_cmd(
    cache: Path = typer.Argument(..., help="HDF5 feature cache (only its training split is read)."),
    loss: LossName = typer.Option(_D.loss, help="Metric loss Lm."),
    trials: int = typer.Option(_D.trials, help="Finished trials the study should reach (continues an existing study)."),
    out: Path = typer.Option(_D.out, "--out", "-o", help="Output directory."),
    storage: str | None = typer.Option(None, help="Optuna storage URL (default sqlite:///OUT/optuna.db); give "
                                                  "several machines the same RDB URL to share one study."),
    study_name: str | None = typer.Option(None, help="Study name (default dvml-<loss>-<dvml|base>-<cache>-s<seed>)."),
    dvml: bool = typer.Option(_D.dvml, "--dvml/--no-dvml", help="--no-dvml: tune the baseline (no λ/T to search)."),
    objective: TuneObjective = typer.Option(_D.objective, help="What to maximise on the held-out validation "
                                                               "classes."),
    val_fraction: float = typer.Option(_D.val_fraction, help="Share of TRAINING classes held out for validation."),
    search: str | None = typer.Option(None, help="Comma-separated subset of: lr, margin, gamma, lambda1..lambda4, "
                                                 "recon_share (k: scales phase-2 lambda1 and lambda2 together, "
                                                 "0.25-64), samples, embedding_size (default all that apply)."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE",
                                          help="A fixed fit-heads option as KEY=VALUE, KEY its flag "
                                               "without the dashes (repeatable), e.g. --set "
                                               "phase2-epoch=5."),
    seed: int = typer.Option(_D.seed, help="Seed of the class split, the sampler and each fit."),
    timeout: float | None = typer.Option(_D.timeout, help="Stop this process after this many seconds."),
    keep_runs: bool = typer.Option(_D.keep_runs, "--keep-runs/--no-keep-runs",
                                   help="Keep every trial's run directory."),
    batch_trials: int = typer.Option(_D.batch_trials, min=1,
                                     help="Ask this many trials at a time and train those that differ only in lr, "
                                          "margin, lambdas or recon_share together, as one stacked model (1: one "
                                          "trial after another)."),
    **fit_fields,
):
    """Optuna search validated on classes held out from the training split (never the test classes)."""
    from dvml.experiments import tune

    objective = choice_value(objective)
    fit = merge_set(fit_overrides(**from_command_line(FitConfig, fit_fields)), parse_set(set_))
    cfg = tune.TuneConfig(cache=cache, loss=loss.value, dvml=dvml, trials=trials, out=out, storage=storage,
                          study_name=study_name, val_fraction=val_fraction, objective=objective, fit=fit,
                          search=None if search is None else tuple(s.strip() for s in search.split(",")),
                          seed=seed, timeout=timeout, keep_runs=keep_runs, batch_trials=batch_trials)

    # the overall bar (finished trials of the target, ETA) starts with the first finished trial: nothing is
    # drawn for a study that is refused before it starts
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=err_console)
    task: list[int] = []
    seconds: list[float] = []

    def on_trial(t: dict) -> None:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        seconds.append(float(t["seconds"] or 0.0))
        left = max(0, t["target"] - t["n_complete"])
        eta = str(timedelta(seconds=int(f"{left * sum(seconds) / len(seconds):.0f}")))  # mean trial time x trials left
        if not task:
            progress.start()
            task.append(progress.add_task("tune", total=t["target"], eta=eta))
        progress.console.print(f"trial {t['number']}: {objective} {100 * t['value']:.2f} (best "
                               f"{100 * t['best_value']:.2f}) [{t['n_complete']}/{t['target']}] {t['seconds']:.1f}s  "
                               f"{params}", highlight=False)
        progress.update(task[0], completed=t["n_complete"], eta=eta)

    try:
        result = tune.run(cfg, callback=on_trial)
    finally:
        progress.stop()
    best = result["best"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    console.print(f"best trial {best['number']}: validation {objective} {100 * best['value']:.2f}% with {params}")
    console.print(f"wrote {result['best_config_file']} (use: dvml fit-heads {cache} --config "
                  f"{result['best_config_file']} --out RUN_DIR) and {Path(cfg.out) / tune.SUMMARY_FILE}")
