"""``dvml fit-heads CACHE.h5 --out RUN_DIR``: train the DVML heads on cached features (see :mod:`dvml.heads`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.options import LOSS_OPTS, format_lambdas, parse_lambdas
from dvml.cli.render import format_terms
from dvml.heads.config import DeviceChoice, FitConfig, Reduction
from dvml.losses import LossName


def _merge_config_file(ctx: typer.Context, kw: dict, path: Path) -> dict:
    """Fit options from a JSON file (e.g. ``dvml tune``'s best_config.json: FitConfig fields without cache/out)
    for every option not given on the command line; options given on the command line win."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of fit options")
    unknown = sorted(set(data) - set(kw) - {"cache", "out"})
    if unknown:
        raise ValueError(f"--config {path}: unknown fit option(s) {', '.join(unknown)}")
    merged = dict(kw)
    for key, value in data.items():
        source = ctx.get_parameter_source(key)  # click's ParameterSource (vendored by recent typer)
        if key in ("cache", "out") or getattr(source, "name", None) == "COMMANDLINE":
            continue
        merged[key] = tuple(value) if isinstance(value, list) else value
    return merged


@app.command("fit-heads")
@handle_errors
def fit_heads_cmd(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="HDF5 feature cache (dvml extract / dvml synth)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (heads.pt, config.json, log.jsonl)."),
    loss: LossName = typer.Option(FitConfig.loss, help="Metric loss Lm."),
    dvml: bool = typer.Option(FitConfig.dvml, "--dvml/--no-dvml",
                              help="--no-dvml: the baseline, the same embedding layer trained with Lm(z_I) alone."),
    embedding_size: int = typer.Option(FitConfig.embedding_size, help="Embedding size E (z_I, mu, log sigma^2)."),
    decoder_hidden: int = typer.Option(FitConfig.decoder_hidden, help="Decoder hidden width."),
    samples: int = typer.Option(FitConfig.samples, "--samples", "-T", help="T: z_V draws per image and step."),
    epochs: int = typer.Option(FitConfig.epochs, help="Training epochs (N_train // batch-size batches each)."),
    phase2_epoch: int = typer.Option(FitConfig.phase2_epoch,
                                     help="First (0-based) epoch of phase 2 (decoder gradient reaches z_I); "
                                          ">= --epochs keeps phase 1."),
    kl_warmup_epochs: int = typer.Option(FitConfig.kl_warmup_epochs,
                                         help="KL weight rises linearly from 0 over this many epochs (0 = off)."),
    lambdas_phase1: str = typer.Option(format_lambdas(FitConfig.lambdas_phase1),
                                       help="Phase-1 weights: KL, recon, Lm(z_hat), Lm(z_I)."),
    lambdas_phase2: str = typer.Option(format_lambdas(FitConfig.lambdas_phase2),
                                       help="Phase-2 weights: KL, recon, Lm(z_hat), Lm(z_I)."),
    reduction: Reduction = typer.Option(FitConfig.reduction,
                                        help="KL over E and recon over D: sum (the paper's eqs. 8-9) or mean."),
    lr: float = typer.Option(FitConfig.lr, help="Adam learning rate of the heads."),
    proxy_lr: float = typer.Option(None, help="Learning rate of a proxy loss's proxies [default: 100 x --lr]."),
    weight_decay: float = typer.Option(FitConfig.weight_decay, help="Adam weight decay on the heads."),
    batch_size: int = typer.Option(None, help="Images per batch [default: 120 for triplet, 128 otherwise]."),
    per_class: int = typer.Option(None, help="Images per class in a batch [default: 2 for npair, 4 otherwise]."),
    margin: float = LOSS_OPTS["margin"],
    gamma: float = LOSS_OPTS["gamma"],
    temperature: float = LOSS_OPTS["temperature"],
    label_smoothing: float = LOSS_OPTS["label_smoothing"],
    seed: int = typer.Option(FitConfig.seed, help="Seed (initialisation, batches, views, z_V noise)."),
    device: DeviceChoice = typer.Option(FitConfig.device, help="auto = CUDA when available."),
    eval_every: int = typer.Option(FitConfig.eval_every,
                                   help="Log test Recall@1 (watch only) every N epochs and at the end; 0 = never."),
    val_classes: int = typer.Option(FitConfig.val_classes,
                                    help="Hold out K training classes; report the epoch best on them "
                                         "(default: the last epoch)."),
    resume: bool = typer.Option(FitConfig.resume, "--resume/--no-resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(FitConfig.overwrite, "--overwrite/--no-overwrite",
                                   help="Replace a run already in --out."),
    config: Path = typer.Option(None, "--config",
                                help="JSON file of fit options (e.g. dvml tune's best_config.json); options given "
                                     "on the command line override it."),
):
    """Train the DVML heads (z_I, mu, log sigma^2, decoder) on cached features with the four-term loss."""
    from dvml.heads import fit  # lazily: torch is heavy and other commands do not need it

    kw = dict(loss=loss, dvml=dvml, embedding_size=embedding_size,
              decoder_hidden=decoder_hidden, samples=samples, epochs=epochs, phase2_epoch=phase2_epoch,
              kl_warmup_epochs=kl_warmup_epochs,
              lambdas_phase1=parse_lambdas(lambdas_phase1, "--lambdas-phase1"),
              lambdas_phase2=parse_lambdas(lambdas_phase2, "--lambdas-phase2"),
              reduction=reduction, lr=lr, proxy_lr=proxy_lr, weight_decay=weight_decay,
              batch_size=batch_size, per_class=per_class, margin=margin, gamma=gamma, temperature=temperature,
              label_smoothing=label_smoothing, seed=seed, device=device, eval_every=eval_every,
              val_classes=val_classes, resume=resume, overwrite=overwrite)
    if config is not None:
        kw = _merge_config_file(ctx, kw, config)
    cfg = FitConfig(cache=cache, out=out, **kw)
    state = {"last": None, "epoch": 0}
    with make_progress("step", TextColumn("{task.fields[terms]}")) as progress:
        task = progress.add_task("fit-heads", total=None, rate="", terms="")

        def callback(ev):
            if ev.kind == "start":
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
            err_console.print(f"[yellow]interrupted[/] after epoch {state['epoch']}: rerun the same command with "
                              "--resume to continue")
            raise typer.Exit(130) from None
    if state["last"] is not None:
        console.print(f"epoch {state['epoch']}: {format_terms(state['last'])}", highlight=False)
    console.print(f"wrote {run_dir}")
