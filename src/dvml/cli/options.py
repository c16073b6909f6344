"""Options and option parsing shared by several commands (one definition, one name, one form everywhere)."""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer

from dvml.heads.config import DEFAULT_PROXY_LR, DeviceChoice, FitConfig, HeadsConfig, config_fields
from dvml.losses import LOSS_PARAM_DEFAULTS, LOSS_PARAM_NAMES
from dvml.losses.registry import loss_names, loss_spec


def loss_choice(value: str | None) -> str | None:
    """``--loss``'s check: a registered loss name (read from :mod:`dvml.losses.registry` when the command runs,
    so a loss registered before then is accepted although the option was declared earlier)."""
    if value is None:
        return None
    try:
        return loss_spec(value).name
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(loss_names())}") from None


def loss_param_help(name: str) -> str:
    """Help text of a loss-parameter option: which losses take it and their defaults."""
    uses = ", ".join(f"{loss.value} {p[name]:.4g}" for loss, p in LOSS_PARAM_DEFAULTS.items() if name in p)
    return f"Loss parameter, only for: {uses} (the defaults)."


# Help panels: the main panel holds what a first fit needs; the rest is grouped by what it is for.
SCHEDULE_PANEL = "Schedule, loss weights and batches"
LOSS_PANEL = "Loss parameters"
OBJECTIVE_PANEL = "DVML objective and variance branch"
DIAGNOSTICS_PANEL = "Diagnostics"
FIT_PANEL = "Fit options (as fit-heads)"


def in_panel(panel: str, *options: typer.models.OptionInfo) -> None:
    """Show ``options`` in the --help panel ``panel`` instead of the main one."""
    for option in options:
        option.rich_help_panel = panel


def panel(name: str, option: typer.models.OptionInfo) -> typer.models.OptionInfo:
    """``option``, shown in the --help panel ``name``: ``resize: int = panel(IMAGES, typer.Option(...))``."""
    option.rich_help_panel = name
    return option


def loss_param_options() -> dict:
    """The typer options ``--margin``, ``--gamma``, ``--temperature``, ``--label-smoothing`` (fit-heads, finetune)."""
    options = {name: typer.Option(None, help=loss_param_help(name)) for name in LOSS_PARAM_NAMES}
    in_panel(LOSS_PANEL, *options.values())
    return options


LOSS_OPTS = loss_param_options()


def head_options() -> dict:
    """The typer options of the :class:`~dvml.heads.config.HeadsConfig` fields and of resume/overwrite, shared
    by fit-heads and finetune (one name, type, default and help). Defaults that depend on the loss are said in
    parentheses: typer's rich help reads ``[...]`` as markup and would drop the text."""
    H = HeadsConfig
    lam = "weights: KL, recon, Lm(z_hat), Lm(z_I)."
    options = {
        "loss": typer.Option(H.loss.value, callback=loss_choice, metavar="<" + "|".join(loss_names()) + ">",
                             help="Metric loss Lm (any registered loss: dvml.losses.registry)."),
        "dvml": typer.Option(H.dvml, "--dvml/--no-dvml",
                             help="--no-dvml: the baseline, the same embedding layer trained with Lm(z_I) alone."),
        "embedding_size": typer.Option(H.embedding_size, help="Embedding size E (z_I, mu, log sigma^2)."),
        "decoder_hidden": typer.Option(H.decoder_hidden, help="Decoder hidden width."),
        "samples": typer.Option(H.samples, "--samples", "-T", help="T: z_V draws per image and step."),
        "epochs": typer.Option(H.epochs, help="Training epochs."),
        "phase2_epoch": typer.Option(H.phase2_epoch, help="First (0-based) epoch of phase 2 (decoder gradient "
                                                          "reaches z_I); >= --epochs keeps phase 1."),
        "kl_warmup_epochs": typer.Option(H.kl_warmup_epochs,
                                         help="KL weight rises linearly from 0 over this many epochs (0 = off)."),
        "lambdas_phase1": typer.Option(format_lambdas(H.lambdas_phase1), help="Phase-1 " + lam),
        "lambdas_phase2": typer.Option(format_lambdas(H.lambdas_phase2), help="Phase-2 " + lam),
        "lr": typer.Option(H.lr, help="Adam learning rate of the heads."),
        "proxy_lr": typer.Option(H.proxy_lr, help="Learning rate of a proxy loss's proxies (default: "
                                                   f"{DEFAULT_PROXY_LR:g}, whatever --lr is; only proxy losses use "
                                                   "it)."),
        "weight_decay": typer.Option(H.weight_decay, help="Adam weight decay (heads; finetune: and backbone)."),
        "batch_size": typer.Option(H.batch_size, help="Images per batch (finetune: over all processes; "
                                                      "default depends on the loss: 120 for triplet, 128 otherwise; "
                                                      "fitted to the data when it has fewer classes than that needs)."),
        "per_class": typer.Option(H.per_class, help="Images per class in a batch (default depends on the loss: 2 "
                                                    "for npair, 4 otherwise)."),
        "seed": typer.Option(H.seed, help="Seed (initialisation, batches, views / augmentation, z_V noise)."),
        "resume": typer.Option(FitConfig.resume, "--resume/--no-resume", help="Continue an interrupted run in --out."),
        "overwrite": typer.Option(FitConfig.overwrite, "--overwrite/--no-overwrite",
                                  help="Replace a run already in --out (kept in OUT/.replaced-run until the "
                                       "new one finishes; back in place if it fails before its first "
                                       "checkpoint)."),
    }
    in_panel(SCHEDULE_PANEL, *(options[k] for k in ("decoder_hidden", "phase2_epoch", "kl_warmup_epochs",
                                                    "lambdas_phase1", "lambdas_phase2", "proxy_lr", "weight_decay",
                                                    "per_class")))
    return options


def objective_options() -> dict[str, typer.models.OptionInfo]:
    """The typer options of the DVML objective's and variance branch's :class:`~dvml.heads.config.HeadsConfig`
    fields, shared by fit-heads and finetune through :func:`with_options` (typed as those fields)."""
    H = HeadsConfig
    options = {
        "recon_share": typer.Option(H.recon_share, help="k: multiplies the phase-2 KL and reconstruction weights "
                                                        "together: how strongly the decoder's gradient trains z_I "
                                                        "against the metric loss (default 4, with the phase-2 "
                                                        "Lm(z_hat) weight 3.2: chosen on validation classes at "
                                                        "the default schedule; the paper: 1 and 0.8,1,0.2,0.8). "
                                                        "dvml tune searches it."),
        "reduction": typer.Option(H.reduction, help="sum (the paper's eqs. 2, 4, 8, 9: KL over E, recon over D, "
                                                    "triplet losses over their triplets) or mean (per dimension / "
                                                    "non-zero triplet) (default: sum for triplet and triplet-dws, "
                                                    "mean for the other losses)."),
        "metric_reduction": typer.Option(H.metric_reduction, help="Triplet losses over their triplets (default: sum "
                                                                  "with --reduction sum, else nonzero)."),
        "likelihood": typer.Option(H.likelihood, help="Reconstruction term: l2 (the paper) or gaussian (calibrated "
                                                      "decoder: NLL at the maximum-likelihood shared variance, "
                                                      "independent of the features' units)."),
        "standardize": typer.Option(H.standardize, "--standardize/--no-standardize",
                                    help="Reconstruct per-dimension standardised features (training statistics). "
                                         "fit-heads only: finetune refuses it (its features change as the backbone "
                                         "trains)."),
        "free_bits": typer.Option(H.free_bits, help="KL free bits: nats per dimension not charged (0 = off)."),
        "variance_space": typer.Option(H.variance_space, help="raw: z_hat = z_I + s*z_V (the paper); normalized: "
                                                              "z_hat = z_I/||z_I|| + s*z_V (default: where the metric "
                                                              "loss compares: normalized, raw for npair's dot "
                                                              "products)."),
        "variance_scale": typer.Option(H.variance_scale, help="s: unit (1, the paper) or class (the batch's "
                                                              "within-class std per dimension of the embedding z_V "
                                                              "is added to)."),
        "variance_kappa": typer.Option(H.variance_kappa, help="Multiplier of s."),
        "metric_grad_to_variance": typer.Option(H.metric_grad_to_variance,
                                                "--metric-grad-to-variance/--no-metric-grad-to-variance",
                                                help="Whether Lm(z_hat) trains mu and sigma too (the paper) or only "
                                                     "z_I (mu, sigma then learn from the KL and reconstruction; the "
                                                     "default: through mu and sigma, Lm(z_hat) made its own samples "
                                                     "easy and mu input-independent)."),
        "centre_mu": typer.Option(H.centre_mu, "--centre-mu/--no-centre-mu",
                                  help="Centre the posterior mean within each class of the batch."),
        "synthetic_pairs": typer.Option(H.synthetic_pairs, help="What Lm(z_hat) pairs: within (the paper's eq. 10: "
                                                                "each synthetic batch alone) or cross (Lm(z_I)'s "
                                                                "pairs and triplets, anchors real z_I, positives and "
                                                                "negatives synthetic; triplet, triplet-dws, npair) "
                                                                "(default: within)."),
    }
    in_panel(OBJECTIVE_PANEL, *options.values())
    return options


def with_options(config: type, options: dict[str, typer.models.OptionInfo]) -> Callable[[Callable], Callable]:
    """Decorator: give a typer command the keyword ``options`` (field name -> typer option, typed as the field of
    the dataclass ``config``), which it receives in its ``**kwargs``: one declaration of a group of options for
    every command that takes it (typer reads the signature this sets). The command's own parameters come first
    in ``--help``."""
    types_ = typing.get_type_hints(config)

    def add(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=types_[name])
                 for name, option in options.items()]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=[*own, *added])
        command.__annotations__ = {**typing.get_type_hints(fn), **{p.name: p.annotation for p in added}}
        return command

    return add


def parse_lambdas(text: str, option: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be four comma-separated numbers (KL, recon, Lm(z_hat), Lm(z_I)), "
                         f"got {text!r}") from None
    if len(values) != 4:
        raise ValueError(f"{option} must be four comma-separated numbers (KL, recon, Lm(z_hat), Lm(z_I)), "
                         f"got {text!r}")
    return values  # type: ignore[return-value]


def format_lambdas(lams) -> str:
    return ",".join(f"{v:g}" for v in lams)


class FeatureDtype(str, Enum):
    """On-disk dtype of cached features (extract, synth)."""

    float16 = "float16"
    float32 = "float32"


class Interpolation(str, Enum):
    """Resize interpolation of extract's preprocessing (as :data:`dvml.extract.backbone.INTERPOLATIONS`)."""

    nearest = "nearest"
    nearest_exact = "nearest-exact"
    bilinear = "bilinear"
    bicubic = "bicubic"


class TuneObjective(str, Enum):
    """What dvml tune maximises on the held-out validation classes."""

    recall_at_1 = "recall@1"
    map_at_r = "map@r"


def choice_value(value) -> str | None:
    """An enum option's value as the config takes it (a plain string; None stays None)."""
    return None if value is None else getattr(value, "value", value)


class SearchDevice(str, Enum):
    """Where faiss searches (``dvml evaluate --device``): auto = the GPU when this faiss build has one."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def one_of(new, old, new_flag: str, old_flag: str):
    """The value of an option given under its current name ``new_flag`` or its old, hidden spelling ``old_flag``
    (kept for one release); both with different values is refused."""
    if new is not None and old is not None and new != old:
        raise ValueError(f"{old_flag} is the old spelling of {new_flag}: give {new_flag} only")
    value = new if new is not None else old
    if value is None:
        raise ValueError(f"missing option {new_flag}")
    return value


def device_option(panel: str | None = None):
    """``--device`` of the commands that run fits (ablate, demo, tune): the fit-heads choice, None = its default."""
    return typer.Option(None, help="Fit device: auto (CUDA, then MPS, then CPU), cpu, cuda or mps (default: auto).",
                        rich_help_panel=panel)


DeviceOption = DeviceChoice | None


def fit_defaults() -> dict:
    """FitConfig's field defaults by name (the help texts of the experiments' fit options)."""
    return {f.name: f.default for f in config_fields(FitConfig)}


FIT_DEFAULTS = fit_defaults()

FIT_HELP = "Fit option shared by every run (default: fit-heads' default {})."


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def _type_problem(value, tp) -> str | None:
    """Why ``value`` (from JSON or ``--set``) does not fit the annotation ``tp``, or None when it does."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        probs = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in probs) else probs[0]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return f"expected a list of {len(args)} numbers, got {value!r}"
        if len(value) != len(args) or any(_type_problem(v, a) for v, a in zip(value, args, strict=False)):
            return f"expected a list of {len(args)} numbers, got {value!r}"
        return None
    if isinstance(tp, type) and issubclass(tp, Enum):
        names = [m.value for m in tp]
        return None if value in names or isinstance(value, tp) else f"expected one of {', '.join(names)}, got {value!r}"
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          Path: lambda v: isinstance(v, str | Path)}.get(tp)
    if ok is None or ok(value):
        return None
    return f"expected {_TYPE_WORDS[tp]}, got {value!r}"


def check_field_types(cls, values: dict, where: str) -> None:
    """Check ``values`` (e.g. a JSON config file, ``--set`` pairs) against the field types of the dataclass
    ``cls``: an unknown key or a value of the wrong type is a ValueError naming ``where``, the key and the type
    expected (``--config c.json: lr: expected a number, got 'fast'``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in config_fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(names)}")
    for key, value in values.items():
        problem = _type_problem(value, hints[key])
        if problem:
            raise ValueError(f"{where}: {key}: {problem}")


def parse_set(items: list[str] | None) -> dict:
    """``--set key=value`` pairs -> FitConfig overrides. A key is spelled as the fit-heads flag without its dashes
    (``phase2-epoch``, ``lambdas-phase2``; the field name ``phase2_epoch`` is accepted too). Values parse as JSON
    when they do (numbers, true/false, lists), ``a,b,c`` as a list of numbers, else they are kept as strings."""
    names = {f.name for f in config_fields(FitConfig)}
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise ValueError(f"--set {key.replace('_', '-')}: not a fit option; known: {known}")
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
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        check_field_types(FitConfig, {key: parsed}, f"--set {item}")
        if key in out and out[key] != parsed:
            raise ValueError(f"--set {key.replace('_', '-')} is given twice with different values ({out[key]!r}, "
                             f"{parsed!r})")
        out[key] = parsed
    return out


def merge_set(explicit: dict, items: list[str] | None) -> dict:
    """The fit options of a command's own flags (``explicit``, from :func:`fit_overrides`) with its ``--set``
    pairs; a key given both ways with different values is refused (which one wins would be a guess)."""
    extra = parse_set(items)
    for key in sorted(set(explicit) & set(extra)):
        if explicit[key] != extra[key]:
            raise ValueError(f"--set {key.replace('_', '-')}={extra[key]!r} conflicts with --{key.replace('_', '-')} "
                             f"{explicit[key]!r}; give the option once")
    return {**explicit, **extra}


def fit_overrides(**opts) -> dict:
    """Options left at None are not passed (fit-heads' defaults apply)."""
    out = {}
    for k, v in opts.items():
        if v is None:
            continue
        out[k] = v.value if hasattr(v, "value") and not isinstance(v, int | float | str) else v
    return out


HEAD_OPTS = head_options()
objective = with_options(HeadsConfig, objective_options())  # @objective: fit-heads' and finetune's options


def refuse_resume_with_overwrite(cfg) -> None:
    """``--resume`` continues the run in ``--out`` and ``--overwrite`` replaces it: given together, which one was
    meant is a guess (the run would silently start again), so they are refused."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
