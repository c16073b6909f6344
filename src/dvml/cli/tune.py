"""``dvml tune CACHE``: Optuna search on held-out training classes (see :mod:`dvml.experiments.tune`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.cli.bind import bind, from_command_line, merge_set, parse_set
from dvml.cli.options import fit_overrides
from dvml.experiments.tune import TuneConfig
from dvml.heads.config import FitConfig

#: TuneConfig fields offered as flags, declared beside the fields (dvml.experiments.tune.TuneConfig).
TUNE_FIELDS = ("loss", "trials", "out", "storage", "study_name", "dvml", "objective", "val_fraction", "search", "seed",
               "timeout", "keep_runs", "batch_trials")
#: The fit options tune offers as flags (any other: --set), each as fit-heads' (dvml.cli.bind, passthrough).
TUNE_FIT_FIELDS = ("epochs", "batch_size", "device")


@app.command("tune")
@handle_errors
@bind(TuneConfig, TUNE_FIELDS)
@bind(FitConfig, TUNE_FIT_FIELDS, passthrough=True)
def tune_cmd(
    cache: Path = typer.Argument(..., help="HDF5 feature cache (only its training split is read)."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE",
                                          help="A fixed fit-heads option as KEY=VALUE, KEY its flag "
                                               "without the dashes (repeatable), e.g. --set "
                                               "phase2-epoch=5."),
    **fields,
):
    """Optuna search validated on classes held out from the training split (never the test classes)."""
    from dvml.experiments import tune

    own = from_command_line(TuneConfig, {k: fields.pop(k) for k in TUNE_FIELDS})
    fit = merge_set(fit_overrides(**from_command_line(FitConfig, fields)), parse_set(set_))
    cfg = tune.TuneConfig(cache=cache, fit=fit, **own)
    objective = cfg.objective

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
