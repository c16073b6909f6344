"""``dvml fit-heads CACHE.h5 --out RUN_DIR``: train the DVML heads on cached features (see :mod:`dvml.heads`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn

from dvml.cli.app import app, console, err_console, handle_errors, make_progress
from dvml.cli.options import (
    DIAGNOSTICS_PANEL,
    HEAD_OPTS,
    LOSS_OPTS,
    SCHEDULE_PANEL,
    check_field_types,
    objective,
    parse_lambdas,
    refuse_resume_with_overwrite,
)
from dvml.cli.render import format_terms
from dvml.files import os_error_message
from dvml.heads.config import DeviceChoice, FitConfig, Preset, VarianceSource


def _apply_preset(ctx: typer.Context, kw: dict, preset: Preset) -> dict:
    """The preset's values for the options the command line did not give; ``preset`` recorded."""
    from dvml.heads.presets import preset_fields

    given = {k for k in kw if getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE"}
    return {**kw, **preset_fields(preset, given), "preset": preset}


def _merge_config_file(ctx: typer.Context, kw: dict, path: Path) -> dict:
    """Fit options from a JSON file (e.g. ``dvml tune``'s best_config.json: FitConfig fields without cache/out)
    for every option not given on the command line; options given on the command line win."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: is a directory; expected a JSON file of fit options") from None
    except OSError as e:  # permission denied, ...: the option as well as the file and the cause
        raise ValueError(f"--config {os_error_message(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a text file; expected a JSON file of fit options") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of fit options")
    unknown = sorted(set(data) - set(kw) - {"cache", "out"})
    if unknown:
        raise ValueError(f"--config {path}: unknown fit option(s) {', '.join(unknown)}")
    check_field_types(FitConfig, data, f"--config {path}")  # {"lr": "fast"}: one line, not a TypeError
    merged = dict(kw)
    for key, value in data.items():
        source = ctx.get_parameter_source(key)  # click's ParameterSource (vendored by recent typer)
        if key in ("cache", "out") or getattr(source, "name", None) == "COMMANDLINE":
            continue
        merged[key] = tuple(value) if isinstance(value, list) else value
    return merged


@app.command("fit-heads")
@handle_errors
@objective
def fit_heads_cmd(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="HDF5 feature cache (dvml extract / dvml synth)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (heads.pt, config.json, log.jsonl)."),
    loss: str = HEAD_OPTS["loss"],
    dvml: bool = HEAD_OPTS["dvml"],
    embedding_size: int = HEAD_OPTS["embedding_size"],
    decoder_hidden: int = HEAD_OPTS["decoder_hidden"],
    samples: int = HEAD_OPTS["samples"],
    epochs: int = HEAD_OPTS["epochs"],
    phase2_epoch: int = HEAD_OPTS["phase2_epoch"],
    kl_warmup_epochs: int = HEAD_OPTS["kl_warmup_epochs"],
    lambdas_phase1: str = HEAD_OPTS["lambdas_phase1"],
    lambdas_phase2: str = HEAD_OPTS["lambdas_phase2"],
    diag_images: int = typer.Option(FitConfig.diag_images, rich_help_panel=DIAGNOSTICS_PANEL,
                                    help="Training images (view 0, seeded subset) of the per-epoch diagnostics; "
                                         "0 = off."),
    grad_every: int = typer.Option(FitConfig.grad_every, rich_help_panel=DIAGNOSTICS_PANEL,
                                   help="Sample the per-term gradients on the embedding layer every N steps (and "
                                        "at each epoch's first step); 0 = off."),
    variance_source: VarianceSource = typer.Option(
        FitConfig.variance_source, rich_help_panel="DVML objective and variance branch",
        help="learned: z_V drawn from the learned posterior (DVML); noise: the control arm, trained exactly as DVML "
             "but z_V is isotropic N(0, I) noise at the same per-batch scale (no encoder, KL 0; decoder and "
             "reconstruction kept)."),
    triplet_input: bool = typer.Option(FitConfig.triplet_input, "--triplet-input/--no-triplet-input",
                                       rich_help_panel=SCHEDULE_PANEL,
                                       help="triplet loss: batches of 40 explicit triplets (the paper's triplet "
                                            "input) instead of every triplet of a class-balanced batch."),
    lr: float = HEAD_OPTS["lr"],
    proxy_lr: float = HEAD_OPTS["proxy_lr"],
    weight_decay: float = HEAD_OPTS["weight_decay"],
    batch_size: int = HEAD_OPTS["batch_size"],
    per_class: int = HEAD_OPTS["per_class"],
    margin: float = LOSS_OPTS["margin"],
    gamma: float = LOSS_OPTS["gamma"],
    temperature: float = LOSS_OPTS["temperature"],
    label_smoothing: float = LOSS_OPTS["label_smoothing"],
    seed: int = HEAD_OPTS["seed"],
    device: DeviceChoice = typer.Option(FitConfig.device, help="auto = CUDA, then MPS (Apple silicon), then CPU."),
    eval_every: int = typer.Option(FitConfig.eval_every,
                                   help="Log test Recall@1 (watch only) every N epochs and at the end; 0 = never."),
    val_classes: int = typer.Option(FitConfig.val_classes,
                                    help="Hold out K training classes; report the epoch best on them "
                                         "(default: the last epoch)."),
    resume: bool = HEAD_OPTS["resume"],
    overwrite: bool = HEAD_OPTS["overwrite"],
    preset: Preset = typer.Option(FitConfig.preset, "--preset",
                               help="Defaults for the options not given: dvml (fit-heads' defaults, phase-2 weights "
                                    "chosen by the written protocol, docs/protocol.md) or paper (every setting as "
                                    "the paper has it: phase-2 weights 0.8,1,0.2,0.8, recon share 1, l2 "
                                    "reconstruction, raw z_I, unit scale, Lm(z_hat) trains mu and sigma). Recorded "
                                    "in config.json."),
    config: Path = typer.Option(None, "--config",
                                help="JSON file of fit options (e.g. dvml tune's best_config.json); options given "
                                     "on the command line override it."),
    **objective_opts,
):
    """Train the DVML heads (z_I, mu, log sigma^2, decoder) on cached features with the four-term loss."""
    from dvml.heads import fit  # lazily: torch is heavy and other commands do not need it

    kw = dict(loss=loss, dvml=dvml, embedding_size=embedding_size,
              decoder_hidden=decoder_hidden, samples=samples, epochs=epochs, phase2_epoch=phase2_epoch,
              kl_warmup_epochs=kl_warmup_epochs,
              lambdas_phase1=parse_lambdas(lambdas_phase1, "--lambdas-phase1"),
              lambdas_phase2=parse_lambdas(lambdas_phase2, "--lambdas-phase2"),
              variance_source=variance_source, diag_images=diag_images, grad_every=grad_every,
              triplet_input=triplet_input, lr=lr, proxy_lr=proxy_lr,
              weight_decay=weight_decay,
              batch_size=batch_size, per_class=per_class, margin=margin, gamma=gamma, temperature=temperature,
              label_smoothing=label_smoothing, seed=seed, device=device, eval_every=eval_every,
              val_classes=val_classes, resume=resume, overwrite=overwrite, **objective_opts)
    kw = _apply_preset(ctx, kw, preset)
    if config is not None:  # a --config file's values win over the preset's, the command line's over both
        kw = _merge_config_file(ctx, kw, config)
    cfg = FitConfig(cache=cache, out=out, **kw)
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
