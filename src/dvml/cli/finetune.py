"""``dvml finetune DATASET --root DIR --out RUN_DIR`` (DATASET any entry of :mod:`dvml.extract.registry`): backbone
+ DVML heads end to end (see :mod:`dvml.finetune`).
Multi-GPU: ``torchrun --standalone --nproc_per_node=N --no-python dvml finetune ...``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.bind import bind, resolve_config
from dvml.cli.datasets import dataset_choice, metavar
from dvml.cli.options import refuse_resume_with_overwrite
from dvml.cli.render import format_terms
from dvml.extract.registry import dataset_names
from dvml.finetune.config import FinetuneConfig

TORCHRUN = "torchrun --standalone --nproc_per_node=N --no-python dvml finetune ..."

#: finetune's options: FinetuneConfig fields (the DATASET argument aside), in --help order. variance_source is
#: reached through --set / --config.
FINETUNE_FIELDS = ("root", "out", "loss", "dvml", "backbone", "weights", "init_heads", "backbone_lr", "lr", "proxy_lr",
                   "weight_decay", "epochs", "steps_per_epoch", "phase2_epoch", "kl_warmup_epochs", "lambdas_phase1",
                   "lambdas_phase2", "embedding_size", "decoder_hidden", "samples", "batch_size", "per_class",
                   "margin", "gamma", "temperature", "label_smoothing", "freeze_bn", "amp", "resize", "crop",
                   "train_classes", "transform_input", "checkpoint_every", "workers", "seed", "device", "resume",
                   "overwrite", "skip_bad", "recon_share", "reduction", "metric_reduction", "likelihood",
                   "standardize", "free_bits", "variance_space", "variance_scale", "variance_kappa",
                   "metric_grad_to_variance", "centre_mu", "synthetic_pairs")
OVERRIDES_PANEL = "Config file and overrides"


@app.command("finetune", epilog=f"Multi-GPU (one process per GPU, DDP over NCCL; gloo on CPU): {TORCHRUN} "
                                "--batch-size is the global batch and must be divisible by N.")
@handle_errors
@bind(FinetuneConfig, FINETUNE_FIELDS)
def finetune_cmd(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., callback=dataset_choice, metavar=metavar(dataset_names()),
                                  help="Dataset format of --root (any registered dataset: dvml.extract.registry)."),
    config: Path = typer.Option(None, "--config", rich_help_panel=OVERRIDES_PANEL,
                                help="JSON file of finetune options (FinetuneConfig fields); options given on the "
                                     "command line override it."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", rich_help_panel=OVERRIDES_PANEL,
                                          help="An option as KEY=VALUE, KEY its flag without the dashes or the field "
                                               "name (repeatable; e.g. --set variance-source=noise); checked against "
                                               "the field's type. Wins over --config."),
    **fields,
):
    """Train the backbone (GoogLeNet by default) and the DVML heads together from images (the paper's end-to-end
    setting).

    Augmentation: resize, random crop, horizontal flip. Two phases, loss weights and the DVML objective options
    (and their defaults) as in fit-heads; --standardize is fit-heads only. Evaluate the result with
    `dvml evaluate RUN_DIR`. Interrupted? Rerun with --resume.
    """
    cfg = resolve_config(FinetuneConfig, ctx, fields, fixed={"dataset": dataset}, config_file=config,
                         set_items=set_)
    refuse_resume_with_overwrite(cfg)
    from dvml.finetune import distributed as D  # torch: after the arguments are checked
    from dvml.finetune import finetune

    main = D.env_rank() == 0  # under torchrun only rank 0 draws and prints
    state = {"last": None, "epoch": 0}
    progress = make_progress("step", TextColumn("{task.fields[terms]}"))
    progress.disable = not main
    with progress:
        task = progress.add_task("finetune", total=None, rate="", terms="")

        def callback(ev):
            if ev.kind == "start":
                progress.update(task, total=ev.epochs * ev.steps, completed=ev.epoch * ev.steps + ev.step,
                                description=f"epoch {ev.epoch + 1}/{ev.epochs}")
            elif ev.kind == "step":
                progress.update(task, advance=1, description=f"epoch {ev.epoch + 1}/{ev.epochs}",
                                terms=f"L {ev.record['total']:.4g}")
            elif ev.kind == "epoch":
                state["last"], state["epoch"] = ev.record, ev.epoch
                progress.update(task, terms=format_terms(ev.record))

        try:
            run_dir = finetune(cfg, callback=callback)
        except KeyboardInterrupt:
            if main:
                how = "--resume in place of --overwrite" if cfg.overwrite else "--resume"
                err_console.print(f"[yellow]interrupted[/]: rerun the same command with {how} to continue from "
                                  "the last checkpoint")
            raise typer.Exit(130) from None
    if main:
        if state["last"] is not None:
            console.print(f"epoch {state['epoch']}: {format_terms(state['last'])}", highlight=False)
        console.print(f"wrote {run_dir}  (evaluate: dvml evaluate {run_dir})")
