"""``dvml finetune cub|cars196|sop|folder --root DIR --out RUN_DIR``: backbone + DVML heads end to end (see
:mod:`dvml.finetune`). Multi-GPU: ``torchrun --standalone --nproc_per_node=N --no-python dvml finetune ...``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.options import (
    HEAD_OPTS,
    LOSS_OPTS,
    SCHEDULE_PANEL,
    objective,
    panel,
    parse_lambdas,
    refuse_resume_with_overwrite,
)
from dvml.cli.render import format_terms
from dvml.extract.datasets import DatasetName
from dvml.finetune import FinetuneConfig
from dvml.heads.config import DeviceChoice

_F = FinetuneConfig  # option defaults are the config dataclass defaults
IMAGES_PANEL = "Images and augmentation"

TORCHRUN = "torchrun --standalone --nproc_per_node=N --no-python dvml finetune ..."


@app.command("finetune", epilog=f"Multi-GPU (one process per GPU, DDP over NCCL; gloo on CPU): {TORCHRUN} "
                                "--batch-size is the global batch and must be divisible by N.")
@handle_errors
@objective
def finetune_cmd(
    dataset: DatasetName = typer.Argument(..., help="Dataset format of --root."),
    root: Path = typer.Option(..., "--root", help="Dataset directory (as for dvml extract)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (heads.pt, backbone.pt, checkpoint.pt, "
                             "config.json, log.jsonl)."),
    loss: str = HEAD_OPTS["loss"],
    dvml: bool = HEAD_OPTS["dvml"],
    backbone: str = typer.Option(_F.backbone, help="googlenet (the paper's), any torchvision classification model "
                                 "(resnet50, efficientnet_b0, vit_b_16, ...) or timm:NAME (pip install "
                                 "'dvml\\[timm]'), as for dvml extract."),
    weights: str = typer.Option(_F.weights, help="Backbone start: 'imagenet', 'none' (seeded random, tests) or a "
                                "state-dict path for that backbone."),
    init_heads: Path = typer.Option(None, "--init-heads", help="Start the heads from this fit-heads run "
                                    "(cached-feature warm start)."),
    backbone_lr: float = typer.Option(_F.backbone_lr, help="Adam learning rate of the backbone (the paper: 1e-4 "
                                      "for the whole network; 1e-5 is gentler after --init-heads)."),
    lr: float = HEAD_OPTS["lr"],
    proxy_lr: float = HEAD_OPTS["proxy_lr"],
    weight_decay: float = HEAD_OPTS["weight_decay"],
    epochs: int = HEAD_OPTS["epochs"],
    steps_per_epoch: int = panel(SCHEDULE_PANEL, typer.Option(None, help="Global batches per epoch (default: "
                                                                          "N_train // batch-size).")),
    phase2_epoch: int = HEAD_OPTS["phase2_epoch"],
    kl_warmup_epochs: int = HEAD_OPTS["kl_warmup_epochs"],
    lambdas_phase1: str = HEAD_OPTS["lambdas_phase1"],
    lambdas_phase2: str = HEAD_OPTS["lambdas_phase2"],
    embedding_size: int = HEAD_OPTS["embedding_size"],
    decoder_hidden: int = HEAD_OPTS["decoder_hidden"],
    samples: int = HEAD_OPTS["samples"],
    batch_size: int = HEAD_OPTS["batch_size"],
    per_class: int = HEAD_OPTS["per_class"],
    margin: float = LOSS_OPTS["margin"],
    gamma: float = LOSS_OPTS["gamma"],
    temperature: float = LOSS_OPTS["temperature"],
    label_smoothing: float = LOSS_OPTS["label_smoothing"],
    freeze_bn: bool = panel(IMAGES_PANEL, typer.Option(_F.freeze_bn, "--freeze-bn/--train-bn",
                                   help="Keep BatchNorm in eval mode with frozen affine parameters.")),
    amp: bool = typer.Option(_F.amp, help="Mixed precision on CUDA (bfloat16, else float16 + grad scaling)."),
    resize: int = panel(IMAGES_PANEL, typer.Option(None, help="Shorter side after resizing (default: the "
                                                              "backbone's, e.g. 256).")),
    crop: int = panel(IMAGES_PANEL, typer.Option(None, help="Random-crop size (default: the backbone's input size, "
                                                            "e.g. 224).")),
    train_classes: int = panel(IMAGES_PANEL, typer.Option(None, help="folder only: number of (sorted) training "
                                                                     "classes.")),
    transform_input: bool = panel(IMAGES_PANEL, typer.Option(None, "--transform-input/--no-transform-input",
                                         help="torchvision GoogLeNet input re-normalisation (default: the weights' "
                                         "convention).")),
    checkpoint_every: int = panel(SCHEDULE_PANEL, typer.Option(_F.checkpoint_every,
                                         help="Also checkpoint every N steps (0 = epoch ends only).")),
    workers: int = typer.Option(_F.workers, help="DataLoader worker processes per training process."),
    seed: int = HEAD_OPTS["seed"],
    device: DeviceChoice = typer.Option(_F.device, help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps (under "
                                                        "torchrun, cuda is each process's cuda:LOCAL_RANK)."),
    resume: bool = HEAD_OPTS["resume"],
    overwrite: bool = HEAD_OPTS["overwrite"],
    skip_bad: bool = panel(IMAGES_PANEL, typer.Option(_F.skip_bad, help="Leave unreadable training images out (one "
                                  "decoding pass before training; listed in config.json) instead of stopping.")),
    **objective_opts,
):
    """Train the backbone (GoogLeNet by default) and the DVML heads together from images (the paper's end-to-end
    setting).

    Augmentation: resize, random crop, horizontal flip. Two phases, loss weights and the DVML objective options
    (and their defaults) as in fit-heads; --standardize is fit-heads only. Evaluate the result with
    `dvml evaluate RUN_DIR`. Interrupted? Rerun with --resume.
    """
    cfg = FinetuneConfig(dataset=dataset, root=root, out=out, loss=loss, dvml=dvml, backbone=backbone, weights=weights,
                         init_heads=init_heads, backbone_lr=backbone_lr, lr=lr, proxy_lr=proxy_lr,
                         weight_decay=weight_decay, epochs=epochs, steps_per_epoch=steps_per_epoch,
                         phase2_epoch=phase2_epoch, kl_warmup_epochs=kl_warmup_epochs,
                         lambdas_phase1=parse_lambdas(lambdas_phase1, "--lambdas-phase1"),
                         lambdas_phase2=parse_lambdas(lambdas_phase2, "--lambdas-phase2"),
                         embedding_size=embedding_size, decoder_hidden=decoder_hidden, samples=samples,
                         batch_size=batch_size, per_class=per_class, margin=margin, gamma=gamma,
                         temperature=temperature, label_smoothing=label_smoothing, freeze_bn=freeze_bn, amp=amp,
                         resize=resize, crop=crop, train_classes=train_classes, transform_input=transform_input,
                         checkpoint_every=checkpoint_every, seed=seed, device=device.value, resume=resume,
                         overwrite=overwrite, workers=workers, skip_bad=skip_bad, **objective_opts)
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
