"""``dvml fit-heads CACHE.h5 --out RUN_DIR``: train the DVML heads on cached features (see :mod:`dvml.heads`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.bind import bind, resolve_config
from dvml.cli.options import refuse_resume_with_overwrite
from dvml.cli.render import format_terms
from dvml.heads.config import FitConfig

#: fit-heads' options: every settable FitConfig field but the CACHE argument, in --help order.
FIT_HEADS_FIELDS = ("out", "loss", "dvml", "embedding_size", "decoder_hidden", "samples", "epochs", "phase2_epoch",
                    "kl_warmup_epochs", "lambdas_phase1", "lambdas_phase2", "diag_images", "grad_every",
                    "variance_source", "triplet_input", "lr", "proxy_lr", "weight_decay", "batch_size", "per_class",
                    "margin", "gamma", "temperature", "label_smoothing", "seed", "device", "eval_every",
                    "val_classes", "resume", "overwrite", "preset", "recon_share", "reduction", "metric_reduction",
                    "likelihood", "standardize", "free_bits", "variance_space", "variance_scale", "variance_kappa",
                    "metric_grad_to_variance", "centre_mu", "synthetic_pairs")
CONFIG_HELP = ("JSON file of fit options (FitConfig fields, e.g. dvml tune's best_config.json); options given on the "
               "command line override it.")
SET_HELP = ("A fit option as KEY=VALUE, KEY its flag without the dashes or the field name (repeatable; e.g. --set "
            "lambdas-phase2=0.8,1,0.2,0.8); checked against the field's type. Wins over --config.")


@app.command("fit-heads")
@handle_errors
@bind(FitConfig, FIT_HEADS_FIELDS)
def fit_heads_cmd(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="HDF5 feature cache (dvml extract / dvml synth)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    **fields,
):
    """Train the DVML heads (z_I, mu, log sigma^2, decoder) on cached features with the four-term loss."""
    from dvml.heads import fit  # lazily: torch is heavy and other commands do not need it

    cfg = resolve_config(FitConfig, ctx, fields, fixed={"cache": cache}, config_file=config, set_items=set_)
    refuse_resume_with_overwrite(cfg)
    state = {"last": None, "epoch": 0}
    progress = make_progress("step", TextColumn("{task.fields[terms]}"))
    task = progress.add_task("fit-heads", total=None, rate="", terms="")

    def callback(ev):
        if ev.kind == "start":  # the bar starts with the fit itself, after every check: a refused fit draws nothing
            progress.start()
            progress.update(task, total=ev.epochs * ev.steps, completed=ev.epoch * ev.steps,
                            description=f"epoch {ev.epoch + 1}/{ev.epochs}")
        elif ev.kind == "step":
            progress.advance(task, 1)
        elif ev.kind == "epoch":
            state["last"], state["epoch"] = ev.record, ev.epoch
            progress.update(task, description=f"epoch {min(ev.epoch + 1, ev.epochs)}/{ev.epochs}",
                            terms=format_terms(ev.record))

    try:
        run_dir = fit(cfg, callback=callback)
    except KeyboardInterrupt:
        progress.stop()
        how = "--resume in place of --overwrite" if cfg.overwrite else "--resume"
        err_console.print(f"[yellow]interrupted[/] after epoch {state['epoch']}: rerun the same command with "
                          f"{how} to continue")
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    if state["last"] is not None:
        console.print(f"epoch {state['epoch']}: {format_terms(state['last'])}", highlight=False)
    console.print(f"wrote {run_dir}")
