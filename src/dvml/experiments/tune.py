"""``dvml tune``: Optuna search of fit-heads hyper-parameters, validated on held-out TRAINING classes.

The test classes are never touched. The cache's training split is divided by class: a seeded
``val_fraction`` of the training classes becomes the validation set, the rest trains. Every trial fits on
the remaining training classes (the validation split is what fit sees as its "test" for watching) and is
scored by ``objective`` (Recall@1 or MAP@R) on the validation classes. The cache's test split is never
loaded, so no test label can reach a fit or the objective (asserted by ``tests/heads/test_tune.py``).

Search space (each only where it applies): ``lr`` (log-uniform), the loss's ``margin`` and (DR losses)
``gamma``, the four λ of DVML's loss and the reconstruction's share k (``recon_share``), the number of draws ``T``
and the embedding size. ``trials`` is the number of *finished* trials the study should hold: running the command
again continues the study up to that number.

Several machines can work on one study: give each the same ``--storage`` URL of a shared relational
database (any SQLAlchemy URL Optuna accepts, e.g. ``postgresql://user@host/db`` or
``mysql+pymysql://user@host/db``) and the same ``--study-name``; each process asks the storage for the
next trial, so they cooperate rather than repeat. Without ``--storage`` the study lives in SQLite,
``OUT/optuna.db`` (fine for one machine; SQLite on a network file system is not safe for concurrent
writers). Processes may share one ``OUT``: each trial's run directory is its own (numbered by the study) and
locked by its fit, and ``best_config.json`` / ``tune.json`` are replaced atomically (the last process to finish
writes them), so ``OUT`` itself is not locked.

Outputs in ``OUT``: ``best_config.json`` (a fit-heads config: ``dvml fit-heads CACHE --config
OUT/best_config.json`` trains the winner on the full training split), ``tune.json`` (the study summary: best
value and parameters, validation classes, every trial), and ``trials/<number>/`` run dirs (deleted after
scoring unless ``keep_runs``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from dvml import __version__, files
from dvml import runs as R
from dvml._lazy import lazy_function
from dvml.cache import CacheError, Split, fingerprint, load_labels, load_split, read_info
from dvml.config_fields import option
from dvml.errors import DvmlError, FieldError
from dvml.evaluate import evaluate_embeddings
from dvml.experiments.gridlog import GridWarnings
from dvml.heads import FitConfig
from dvml.heads.batch import batch_size_given, fit_batch
from dvml.heads.config import PHASE2_LAMBDAS, config_fields
from dvml.heads.schedule import warn_schedule
from dvml.losses import LossName
from dvml.losses.registry import loss_spec, resolve_loss
from dvml.seeding import hold_out_classes

fit = lazy_function("dvml.heads.train", "fit")  # torch on first use, not for declaring the CLI
embed = lazy_function("dvml.heads.embed", "embed")

log = logging.getLogger(__name__)

BEST_CONFIG_FILE = "best_config.json"
SUMMARY_FILE = "tune.json"


class Objective(str, Enum):
    """What a study maximises on the held-out validation classes."""

    recall_at_1 = "recall@1"
    map_at_r = "map@r"


OBJECTIVES = tuple(o.value for o in Objective)
EMBEDDING_SIZES = (64, 128, 256, 512)


@dataclass(frozen=True)
class TuneConfig:
    """A tuning study.

    cache: feature cache (only its training split is read). loss: metric loss name. dvml: tune the DVML
    model (False: the --no-dvml baseline, no λ/T). trials: finished trials the study should reach.
    out: output directory. storage: Optuna storage URL (default ``sqlite:///OUT/optuna.db``).
    study_name: default ``dvml-<loss>-<dvml|base>-<cache fingerprint[:8]>-s<seed>``.
    val_fraction: share of the training classes held out for validation (at least 2 classes each side).
    objective: ``recall@1`` or ``map@r`` on the validation classes. fit: fixed FitConfig fields for every
    trial (epochs, batch_size, device, ...). search: names of the parameters to search (default: all that
    apply). seed: seeds the class split, the sampler and every trial's fit. timeout: seconds for this process.
    batch_trials: ask the study for this many trials at a time and train those whose fits can stack together, as
    one stacked model (:mod:`dvml.experiments.tune_batch`); 1 = one trial after another.
    """

    cache: Path
    loss: LossName = field(default=LossName.triplet, metadata=option("Metric loss Lm."))
    dvml: bool = field(default=True, metadata=option("--no-dvml: tune the baseline (no λ/T to search)."))
    trials: int = field(default=20, metadata=option(
        "Finished trials the study should reach (continues an existing study)."))
    out: Path = field(default=Path("dvml-tune"), metadata=option("Output directory.", flags=("--out", "-o")))
    storage: str | None = field(default=None, metadata=option(
        "Optuna storage URL (default sqlite:///OUT/optuna.db); give several machines the same RDB URL to share one "
        "study."))
    study_name: str | None = field(default=None, metadata=option(
        "Study name (default dvml-<loss>-<dvml|base>-<cache>-s<seed>)."))
    val_fraction: float = field(default=0.25, metadata=option("Share of TRAINING classes held out for validation."))
    objective: str = field(default=Objective.recall_at_1.value, metadata=option(
        "What to maximise on the held-out validation classes.", choices=Objective))
    fit: dict[str, Any] = field(default_factory=dict)
    search: tuple[str, ...] | None = field(default=None, metadata=option(
        "Comma-separated subset of: lr, margin, gamma, lambda1..lambda4, recon_share (k: scales phase-2 lambda1 and "
        "lambda2 together, 0.25-64), samples, embedding_size (default all that apply)."))
    seed: int = field(default=0, metadata=option("Seed of the class split, the sampler and each fit."))
    timeout: float | None = field(default=None, metadata=option("Stop this process after this many seconds."))
    keep_runs: bool = field(default=False, metadata=option("Keep every trial's run directory."))
    batch_trials: int = field(default=1, metadata=option(
        "Ask this many trials at a time and train those that differ only in lr, margin, lambdas or recon_share "
        "together, as one stacked model (1: one trial after another)."))

    def __post_init__(self):
        object.__setattr__(self, "cache", Path(self.cache))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "loss", resolve_loss(self.loss))  # a registered loss (FieldError otherwise)
        if self.trials < 1:
            raise FieldError(f"`trials` must be >= 1, got {self.trials}")
        if self.batch_trials < 1:
            raise FieldError(f"`batch_trials` must be >= 1, got {self.batch_trials}")
        if not 0 < self.val_fraction < 1:
            raise FieldError(f"`val_fraction` must be in (0, 1), got {self.val_fraction}")
        if self.objective not in OBJECTIVES:
            raise FieldError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        reserved = {"cache", "out", "loss", "seed", "dvml", "resume", "overwrite"} & set(self.fit)
        if reserved:
            raise ValueError(f"fit options {sorted(reserved)} are set by tune; remove them")

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'optuna.db').resolve()}"


def split_train_classes(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Divide the training classes: (fit classes, validation classes), both sorted, disjoint, seeded
    (:func:`~dvml.seeding.hold_out_classes`, the rule of ``fit-heads --val-classes``).

    Raises DvmlError when either side would have fewer than 2 classes.
    """
    classes = np.unique(labels)
    n_val = int(f"{val_fraction * classes.size:.0f}")
    if n_val < 2 or classes.size - n_val < 2:
        raise DvmlError(f"the training split has {classes.size} classes: holding out {val_fraction:.0%} "
                        f"leaves {classes.size - n_val} to fit and {n_val} to validate; both need >= 2 "
                        "(change `val_fraction`)")
    return hold_out_classes(labels, n_val, seed)


def subset(split: Split, classes: np.ndarray) -> Split:
    """The rows of ``split`` whose label is in ``classes``."""
    mask = np.isin(split.labels, classes)
    return Split(features=split.features[mask], labels=split.labels[mask],
                 paths=None if split.paths is None else split.paths[mask])


_FIT_DEFAULTS = {f.name: f.default for f in config_fields(FitConfig)}


def _fit_fields() -> set[str]:
    return {f.name for f in config_fields(FitConfig)}


LAMBDA_NAMES = ("lambda1", "lambda2", "lambda3", "lambda4")  # searched as FitConfig.lambdas_phase2
#: Log-uniform range of each searched phase-2 λ: holds the paper's (0.2-1) and dvml's earlier default λ3 = 3.2.
LAMBDA_RANGE = (0.05, 8.0)
#: The reconstruction's share k (:attr:`~dvml.heads.config.HeadsConfig.recon_share`): multiplies the phase-2 λ1
#: and λ2 together (the variance branch's β = λ1/λ2 unchanged), i.e. how strongly the decoder's gradient trains
#: z_I against the metric loss — the lever measured in docs/history.md (wordnet N-pair validation
#: Recall@1 up at k = 16, the demo world's down).
RECON_SHARE = "recon_share"
RECON_SHARE_RANGE = (0.25, 64.0)
PHASE2_NAMES = (*LAMBDA_NAMES, RECON_SHARE)  # the weights of phase 2


def search_space(cfg: TuneConfig) -> list[str]:
    """Names of the parameters searched for this config (restricted by ``cfg.search`` if given).

    λ1-λ4 are the phase-2 weights (``lambdas_phase2``, the phase a default run ends in); phase 1 keeps
    the paper's values. ``recon_share`` (k, log-uniform on :data:`RECON_SHARE_RANGE`) is its own FitConfig field
    and scales λ1 and λ2 together. When the trials' fits end before phase 2 starts (``epochs <= phase2_epoch``,
    e.g. ``--epochs 3`` with phase 2 at epoch 30) the phase-2 weights are left out of the search (they would
    never act), and asking for them with ``--search`` is refused: the schedule is not rescaled behind the user's
    back, since ``best_config.json`` must describe the fits that were actually scored. ``margin`` and the
    direction weight ``gamma`` are searched for the losses that take them
    (:data:`~dvml.heads.config.LOSS_PARAM_DEFAULTS`).
    """
    space = ["lr"]
    space += [p for p in ("margin", "gamma") if p in loss_spec(cfg.loss).params]
    epochs = cfg.fit.get("epochs", _FIT_DEFAULTS["epochs"])
    phase2 = cfg.fit.get("phase2_epoch", _FIT_DEFAULTS["phase2_epoch"])
    has_phase2 = phase2 < epochs  # else the phase-2 weights are never used: searching them would be noise
    if cfg.dvml:
        if has_phase2:
            space += [] if "lambdas_phase2" in cfg.fit else list(LAMBDA_NAMES)
            space.append(RECON_SHARE)
        space.append("samples")
    space.append("embedding_size")
    space = [s for s in space if s not in cfg.fit]  # fixed by the user: not searched
    if cfg.search is not None:
        asked = set(cfg.search) & set(PHASE2_NAMES)
        if cfg.dvml and asked and not has_phase2:
            raise DvmlError(f"cannot search {', '.join(sorted(asked))}: they weight phase 2, which starts at epoch "
                            f"{phase2} (phase2_epoch) while each trial fits {epochs} epochs (`epochs`), so they "
                            "would never be used; pass --set phase2-epoch=N with N < `epochs`, or search without "
                            "them")
        unknown = set(cfg.search) - set(space)
        if unknown:
            raise DvmlError(f"cannot search {sorted(unknown)} for this study (searchable: {', '.join(space)})")
        space = [s for s in space if s in cfg.search]
    return space


def suggest(trial, space: list[str]) -> dict[str, Any]:
    """Draw one point of the search space from an Optuna trial, as FitConfig fields (:func:`params_to_fit`: the
    λs folded into ``lambdas_phase2``)."""
    p: dict[str, Any] = {}
    for name in space:
        if name == "lr":
            p[name] = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        elif name == "margin":
            p[name] = trial.suggest_float("margin", 0.02, 0.5)
        elif name == "gamma":
            p[name] = trial.suggest_float("gamma", 0.0, 1.0)
        elif name in LAMBDA_NAMES:
            p[name] = trial.suggest_float(name, *LAMBDA_RANGE, log=True)
        elif name == RECON_SHARE:
            p[name] = trial.suggest_float(name, *RECON_SHARE_RANGE, log=True)
        elif name == "samples":
            p[name] = trial.suggest_int("samples", 1, 32, log=True)
        elif name == "embedding_size":
            p[name] = trial.suggest_categorical("embedding_size", list(EMBEDDING_SIZES))
        else:  # pragma: no cover - search_space only yields the names above
            raise ValueError(name)
    return params_to_fit(p)


def params_to_fit(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's flat parameters (``lambda1``..``lambda4``, ``recon_share``, ...) -> FitConfig fields:
    ``lambdas_phase2`` = (λ1, λ2, λ3, λ4), each λ not searched at its default phase-2 value
    (:data:`~dvml.heads.config.PHASE2_LAMBDAS`); ``recon_share`` is
    a field of its own (FitConfig multiplies the phase-2 λ1 and λ2 by it)."""
    out = {k: v for k, v in params.items() if k not in LAMBDA_NAMES}
    if any(n in params for n in LAMBDA_NAMES):
        out["lambdas_phase2"] = tuple(params.get(n, PHASE2_LAMBDAS[i]) for i, n in enumerate(LAMBDA_NAMES))
    return out


def _study_name(cfg: TuneConfig, fp: str) -> str:
    return cfg.study_name or f"dvml-{cfg.loss.value}-{'dvml' if cfg.dvml else 'base'}-{fp[:8]}-s{cfg.seed}"


def fit_config(cfg: TuneConfig, params: dict[str, Any], out: Path) -> FitConfig:
    """The FitConfig of one trial (fixed options + drawn parameters)."""
    kw = {**cfg.fit, **params, "cache": cfg.cache, "out": out, "loss": cfg.loss, "seed": cfg.seed, "dvml": cfg.dvml}
    unknown = set(kw) - _fit_fields()
    if unknown:
        raise DvmlError(f"unknown fit option(s) {sorted(unknown)}; FitConfig has {sorted(_fit_fields())}")
    return FitConfig(**kw)


def config_file_dict(fit_cfg: FitConfig) -> dict:
    """A FitConfig as the JSON ``fit-heads --config`` reads: every field except paths and run control."""
    d = fit_cfg.to_dict()
    for k in ("cache", "out", "resume", "overwrite"):
        d.pop(k, None)
    if not batch_size_given(fit_cfg):  # fit-heads fits the batch to the full training split again
        d.pop("batch_size", None)
    return d


def trial_dir(cfg: TuneConfig, number: int) -> Path:
    """The run directory of trial ``number`` (``OUT/trials/<number>``)."""
    return cfg.out / "trials" / f"{number:04d}"


def clear_run(out: Path) -> None:
    """Remove a trial's run directory left by an earlier, interrupted process (the trial is fitted afresh)."""
    if out.exists():
        shutil.rmtree(out)


def fit_and_score(cfg: TuneConfig, fit_cfg: FitConfig, train: Split, val: Split) -> dict:
    """Fit one trial one by one (:func:`dvml.heads.fit`) and score it on the validation classes; its run directory
    is removed afterwards unless ``keep_runs``. Raises DvmlError when the fit fails (e.g. a diverging lr)."""
    clear_run(fit_cfg.out)
    try:
        run_dir = fit(fit_cfg, train=train, test=val)
        return score(Path(run_dir), val, cfg.objective)
    finally:
        if not cfg.keep_runs:
            clear_run(fit_cfg.out)


def record_trial(trial, metrics: dict, seconds: float, trainer: str) -> None:
    """What a finished trial keeps beside its value (read by tune.json and the progress line): its validation
    metrics, its seconds (a stacked trial: its share of the stack's) and the trainer that fitted it."""
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("seconds", float(f"{seconds:.3f}"))
    trial.set_user_attr("trainer", trainer)


def score(run_dir: Path, val: Split, objective: str) -> dict:
    """Embed the validation split with a trial's heads and evaluate it (retrieval metrics only)."""
    emb = embed(run_dir, val.features[:, 0])
    return evaluate_embeddings(emb, val.labels, ks=(1,), clustering=False, where=f"validation of {run_dir}")


def run(cfg: TuneConfig, *, callback: Callable[[dict], None] | None = None) -> dict:
    """Run the study until it holds ``cfg.trials`` finished trials; write best_config.json and tune.json.

    ``callback`` receives a dict per finished trial (number, value, params, seconds, best_value).
    Returns the summary written to tune.json.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial instead
    try:
        read_info(cfg.cache)
        fp = fingerprint(cfg.cache)
        labels = load_labels(cfg.cache, "train")
    except CacheError as e:
        raise DvmlError(str(e)) from None
    # everything that can be refused is checked before OUT is created: a refused study leaves nothing behind
    fit_classes, val_classes = split_train_classes(labels, cfg.val_fraction, cfg.seed)
    space = search_space(cfg)
    try:  # unknown or ill-typed fixed options, and a batch the fit classes cannot fill, fail before the study
        check = fit_config(cfg, {}, cfg.out / "trials" / "check")
    except ValueError as e:
        raise DvmlError(str(e)) from None
    grid = GridWarnings()  # the trials' warnings (batch fitted to the data, schedule) said once for the study
    with grid.check():
        fitted, _ = fit_batch(check, labels[np.isin(labels, fit_classes)], where=str(cfg.cache),
                              per_class_option="--set per-class={}")
        warn_schedule(fitted)
    grid.say(log, 1)
    storage = None if cfg.storage is None else _open_storage(cfg.storage)
    created = not cfg.out.exists()
    try:
        files.make_dir(cfg.out)
        with grid.quiet():
            return _run_study(cfg, fp, fit_classes, val_classes, space, storage, callback)
    except BaseException:
        if created and cfg.out.is_dir() and not any(cfg.out.iterdir()):
            cfg.out.rmdir()  # no empty output directory left by a failed study
        raise


def _open_storage(url: str):
    """The Optuna storage of ``--storage URL``, or a DvmlError naming the URL (not a sqlalchemy traceback)."""
    import optuna

    try:
        return optuna.storages.get_storage(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad URL or server
        raise DvmlError(f"`storage` {url}: cannot open the study storage ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _run_study(cfg: TuneConfig, fp: str, fit_classes: np.ndarray, val_classes: np.ndarray, space: list[str],
               storage, callback: Callable[[dict], None] | None) -> dict:
    import optuna

    train_all = load_split(cfg.cache, "train")  # the test split is never read
    train, val = subset(train_all, fit_classes), subset(train_all, val_classes)
    del train_all
    log.info("tuning %s (%s) on %d fit / %d validation classes of the training split; searching %s",
             cfg.loss.value, "DVML" if cfg.dvml else "baseline", fit_classes.size, val_classes.size, ", ".join(space))

    study, sampler_seed = _open_study(cfg, fp, val_classes, storage)

    def objective(trial) -> float:
        t0 = time.perf_counter()
        try:
            metrics = fit_and_score(cfg, fit_config(cfg, suggest(trial, space), trial_dir(cfg, trial.number)),
                                    train, val)
        except DvmlError as e:  # e.g. a diverging lr: a failed trial, not a failed study
            log.warning("trial %d failed: %s", trial.number, e)
            raise optuna.TrialPruned(str(e)) from None
        record_trial(trial, metrics, time.perf_counter() - t0, "one-by-one")
        return float(metrics[cfg.objective])

    def on_trial(study_, trial) -> None:
        if callback is not None and trial.state == optuna.trial.TrialState.COMPLETE:
            best = study_.best_value if _n_complete(study_) else math.nan
            callback({"number": trial.number, "value": trial.value, "params": trial.params,
                      "seconds": trial.user_attrs.get("seconds"), "best_value": best,
                      "n_complete": _n_complete(study_), "target": cfg.trials})

    remaining = cfg.trials - _n_complete(study)
    if remaining > 0 and cfg.batch_trials > 1:
        from dvml.experiments import tune_batch

        tune_batch.optimize(cfg, study, space, train, val, on_trial)
    elif remaining > 0:
        stop = optuna.study.MaxTrialsCallback(cfg.trials, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(objective, n_trials=remaining, timeout=cfg.timeout, callbacks=[on_trial, stop],
                       catch=())
    if not _n_complete(study):
        raise DvmlError(f"no trial of study {study.study_name!r} finished; see the log for the failures")
    return _write_results(cfg, study, fp, fit_classes, val_classes, space, sampler_seed)


def _open_study(cfg: TuneConfig, fp: str, val_classes: np.ndarray, storage=None):
    """Create or join the study (refusing one run on another cache or other validation classes) with its TPE
    sampler; returns (study, sampler seed). ``storage``: the opened ``--storage`` (default: SQLite in OUT)."""
    import optuna

    study = optuna.create_study(storage=storage if storage is not None else cfg.storage_url(),
                                study_name=_study_name(cfg, fp), direction="maximize", load_if_exists=True)
    old_fp = study.user_attrs.get("cache_fingerprint")
    if old_fp not in (None, fp):
        raise DvmlError(f"study {study.study_name!r} in {cfg.storage_url() if cfg.storage is None else '`storage`'} "
                        f"was run on another cache (fingerprint {old_fp}, now {fp}); use another `study_name`")
    old_val = study.user_attrs.get("val_classes")
    if old_val not in (None, [int(c) for c in val_classes]):
        raise DvmlError(f"study {study.study_name!r} validated on other classes (another `seed` or "
                        "`val_fraction`); its trials would not be comparable: use another `study_name`")
    study.set_user_attr("cache_fingerprint", fp)
    study.set_user_attr("val_classes", [int(c) for c in val_classes])
    # A fresh single-machine study is reproducible from cfg.seed. A process joining an existing or shared
    # study mixes in the trial count and its pid: the same seed would replay the same random start-up
    # trials as the process before it (or beside it), wasting them on duplicates.
    n_existing = len(study.get_trials(deepcopy=False))
    sampler_seed = cfg.seed
    if n_existing or cfg.storage is not None:
        sampler_seed = int(np.random.SeedSequence([cfg.seed, n_existing, os.getpid()]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed)

    return study, sampler_seed


def _write_results(cfg: TuneConfig, study, fp: str, fit_classes: np.ndarray, val_classes: np.ndarray,
                   space: list[str], sampler_seed: int) -> dict:
    """Write best_config.json and tune.json; returns the summary."""
    best = study.best_trial
    best_cfg = fit_config(cfg, params_to_fit(best.params), cfg.out)
    best_dict = config_file_dict(best_cfg)
    files.write_json(best_dict, cfg.out / BEST_CONFIG_FILE)
    summary = {
        "study_name": study.study_name, "storage": cfg.storage_url() if cfg.storage is None else "(given)",
        "cache": str(cfg.cache.resolve()), "cache_fingerprint": fp, "loss": cfg.loss.value, "dvml": cfg.dvml,
        "objective": cfg.objective, "objective_split": "validation classes held out from the training split",
        "fit_classes": [int(c) for c in fit_classes], "val_classes": [int(c) for c in val_classes],
        "search_space": space, "sampler_seed": sampler_seed, "batch_trials": cfg.batch_trials,
        "fixed_fit_options": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.fit.items()},
        "best": {"number": best.number, "value": best.value, "params": best.params,
                 "metrics": best.user_attrs.get("metrics")},
        "best_config_file": str(cfg.out / BEST_CONFIG_FILE),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "seconds": t.user_attrs.get("seconds"), "trainer": t.user_attrs.get("trainer")}
                   for t in study.trials],
        "dvml_version": __version__, "versions": R.versions(),
    }
    files.write_json(summary, cfg.out / SUMMARY_FILE)
    return summary


def _n_complete(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
