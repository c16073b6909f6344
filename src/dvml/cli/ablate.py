"""``dvml ablate CACHE -o OUT``: losses x {baseline, DVML} x seeds (see :mod:`dvml.experiments.ablate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors
from dvml.cli.bind import bind, from_command_line, merge_set, parse_set
from dvml.cli.options import fit_overrides, panel
from dvml.cli.render import print_ablation_result, run_ablation
from dvml.experiments.ablate import SCALE_PANEL, AblateConfig
from dvml.experiments.grid_storage import DEFAULT_HEARTBEAT_S
from dvml.heads.config import FitConfig

#: AblateConfig fields offered as flags, declared beside the fields (dvml.experiments.ablate.AblateConfig).
ABLATE_FIELDS = ("losses", "methods", "clustering", "stack", "stack_size")
#: The fit options ablate offers as flags (any other: --set), each as fit-heads' (dvml.cli.bind, passthrough).
ABLATE_FIT_FIELDS = ("epochs", "batch_size", "lr", "embedding_size", "samples", "phase2_epoch", "kl_warmup_epochs",
                     "eval_every", "device")
_SEEDS = AblateConfig.__dataclass_fields__["seeds"].default  # offered as a count and a first seed, not a list


@app.command("ablate")
@handle_errors
@bind(AblateConfig, ABLATE_FIELDS)
@bind(FitConfig, ABLATE_FIT_FIELDS, passthrough=True)
def ablate_cmd(
    cache: Path = typer.Argument(None, help="HDF5 feature cache (not with --summarize)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (rerun the same command to resume)."),
    seeds: int = typer.Option(len(_SEEDS), metavar="N", help="How many seeds per (loss, method), a count: the "
                                                             "seeds are --first-seed, --first-seed + 1, ..."),
    first_seed: int = typer.Option(_SEEDS[0], metavar="SEED", help="The first seed's value."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE",
                                          help="Any other fit-heads option as KEY=VALUE, KEY its "
                                               "flag without the dashes (repeatable), e.g. --set "
                                               "lambdas-phase2=0.8,1,0.2,0.8 or --set gamma=0.3 (a "
                                               "loss parameter must apply to every loss of "
                                               "--losses)."),
    storage: str | None = panel(SCALE_PANEL, typer.Option(
        None, help="Share the grid among workers: an Optuna RDB storage URL (sqlite:///grid.db on one machine, "
                   "postgresql://... or mysql+pymysql://... across machines). Start the same command as many times "
                   "as you like; each cell runs once, a killed worker's cell is taken again, the last worker writes "
                   "the summary. Workers fit the cells they claim one by one (no --stack).")),
    heartbeat: int = panel(SCALE_PANEL, typer.Option(
        DEFAULT_HEARTBEAT_S, min=1, help="With --storage: seconds between a worker's heartbeats; a cell whose worker "
                                         "is silent for 4x this is taken by another.")),
    summarize: Path | None = panel(SCALE_PANEL, typer.Option(
        None, help="Write the summary of the finished grid in this --out directory from its run directories, and "
                   "run nothing.")),
    **fields,
):
    """Grid of losses x {baseline, DVML[, noise control]} x seeds on one cache: results.csv, summary.md, chart,
    live table.

    Many workers, one grid: start the same command with --storage (on one machine or many); see
    docs/distributed.md for the SLURM array-job pattern.
    """
    from dvml.experiments import ablate, grid_storage

    if summarize is not None:
        print_ablation_result(run_ablation(grid_storage.summarize_dir, summarize), title=summarize.name)
        return
    if cache is None or out is None:
        raise ValueError("dvml ablate needs CACHE and --out (or --summarize DIR)")
    own = from_command_line(AblateConfig, {k: fields.pop(k) for k in ABLATE_FIELDS})
    fit = merge_set(fit_overrides(**from_command_line(FitConfig, fields)), parse_set(set_))
    cfg = ablate.AblateConfig(cache=cache, out=out, seeds=tuple(range(first_seed, first_seed + seeds)), fit=fit, **own)
    if storage is None:
        result = run_ablation(ablate.run, cfg)
    else:
        result = run_ablation(grid_storage.run_shared, cfg, storage, heartbeat_s=heartbeat)
        if result.get("summarized_by_another"):
            console.print(f"grid done; the summary is written by another worker in {out}")
            return
    print_ablation_result(result, title=cache.name)
