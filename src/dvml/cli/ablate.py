"""``dvml ablate CACHE -o OUT``: losses x {baseline, DVML} x seeds (see :mod:`dvml.experiments.ablate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, handle_errors
from dvml.cli.options import FIT_DEFAULTS, FIT_HELP, DeviceOption, device_option, fit_overrides, merge_set
from dvml.cli.render import print_ablation_result, run_ablation
from dvml.experiments.ablate import AblateConfig

_D = AblateConfig  # option defaults are the config dataclass defaults


@app.command("ablate")
@handle_errors
def ablate_cmd(
    cache: Path = typer.Argument(..., help="HDF5 feature cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (rerun the same command to resume)."),
    losses: str = typer.Option(",".join(_D.losses), help="Comma-separated metric losses (any fit-heads --loss)."),
    seeds: int = typer.Option(len(_D.seeds), help="Number of seeds per (loss, method): 0..N-1 from --first-seed."),
    first_seed: int = typer.Option(_D.seeds[0], help="First seed."),
    methods: str = typer.Option("base,dvml", help="Comma-separated methods: base (--no-dvml), dvml, noise (the "
                                                  "control: DVML's training with z_V replaced by isotropic noise "
                                                  "of the same scale; the summary adds DVML − noise)."),
    epochs: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["epochs"])),
    batch_size: int | None = typer.Option(None, help="Fit option (default depends on the loss: 120 for "
                                                    "triplet, 128 otherwise; fitted to the data when it has fewer "
                                                    "classes)."),
    lr: float | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["lr"])),
    embedding_size: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["embedding_size"])),
    samples: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["samples"]) + " (T)"),
    phase2_epoch: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["phase2_epoch"])),
    kl_warmup_epochs: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["kl_warmup_epochs"])),
    eval_every: int | None = typer.Option(None, help=FIT_HELP.format(FIT_DEFAULTS["eval_every"])),
    device: DeviceOption = device_option(),
    set_: list[str] | None = typer.Option(None, "--set", help="Any other fit option as KEY=VALUE (repeatable), "
                                                               "e.g. --set lambdas_phase2=0.8,1,0.2,0.8 or --set "
                                                               "gamma=0.3 (a loss parameter must apply to every "
                                                               "loss of --losses)."),
    clustering: bool = typer.Option(_D.clustering, "--clustering/--no-clustering",
                                    help="NMI/F1 (k-means) besides the retrieval metrics."),
):
    """Grid of losses x {baseline, DVML[, noise control]} x seeds on one cache: results.csv, summary.md, chart,
    live table."""
    from dvml.experiments import ablate

    chosen = ablate.parse_methods(methods)
    fit = merge_set(fit_overrides(epochs=epochs, batch_size=batch_size, lr=lr, embedding_size=embedding_size,
                                  samples=samples, phase2_epoch=phase2_epoch, kl_warmup_epochs=kl_warmup_epochs,
                                  eval_every=eval_every, device=device), set_)
    cfg = ablate.AblateConfig(cache=cache, out=out, losses=tuple(losses.split(",")),
                              seeds=tuple(range(first_seed, first_seed + seeds)),
                              methods=chosen, fit=fit,
                              clustering=clustering)
    result = run_ablation(ablate.run, cfg)
    print_ablation_result(result, title=cache.name)
