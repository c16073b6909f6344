"""``dvml tune --batch-trials N``: a study's trials asked N at a time, those that can stack fitted as one model.

Optuna's ask-and-tell: the study is asked for up to N trials (``study.ask()``, N no more than the finished trials
still missing), each gets its FitConfig (:func:`dvml.experiments.tune.fit_config`), and the trials whose fits differ
only in the stacked trainer's member fields (:data:`dvml.heads.stacked.MEMBER_FIELDS`: ``lr``, ``margin``, the λ and
``recon_share``) are trained together by :func:`dvml.heads.stacked.fit_stacked`, each member exactly its one-by-one
fit. Every trial is then scored on the validation classes and told its value (``study.tell``), in trial order.

A trial is fitted one by one instead, with the reason logged (a warning the first time, then at info level), when
its fit does not stack (:func:`dvml.heads.stacked.stack_reason`: e.g. a proxy loss), when stacking would not pay
(:func:`dvml.experiments.stacking.cpu_reason`: large DVML heads on the CPU), or when no other trial of its batch
shares its shapes (``samples`` and ``embedding_size`` are searched by default and change the model's shapes: fix
them with ``--set`` to stack every batch). A stack that fails (a member diverging) is refitted one by one, so
only the diverging trial fails (it is pruned, as one by one).

Each trial records the trainer that fitted it (user attribute ``trainer``: ``stacked`` or ``one-by-one``, also in
its run's ``config.json``) and its share of the stack's time (``seconds``). The trials of a batch are drawn from
the same state of the sampler (TPE samples each independently). A batch interrupted by an exception or Ctrl-C
tells its unfinished trials FAIL; running the command again continues the study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from dvml.errors import DvmlError
from dvml.experiments import tune
from dvml.experiments.stacking import cpu_reason
from dvml.heads import FitConfig

log = logging.getLogger(__name__)

#: Why a trial whose fit stacks was fitted alone.
ALONE = "no other trial of its batch differs from it only in lr, margin, the lambdas or recon_share"


def plan(fit_cfgs: list[FitConfig], feature_dim: int) -> list[tuple[list[int], str | None]]:
    """The batch's fits (in trial order) as the units they are fitted in, ordered by their first trial:
    ``(indices, None)`` for a stack, ``([index], reason)`` for a fit made one by one."""
    from dvml.heads.stacked import group_key, stack_reason

    units: list[tuple[list[int], str | None]] = []
    groups: dict[tuple, list[int]] = {}
    for j, c in enumerate(fit_cfgs):
        why = stack_reason(c) or cpu_reason(c, feature_dim)
        if why:
            units.append(([j], why))
        else:
            groups.setdefault(group_key(c), []).append(j)
    units += [(members, None if len(members) > 1 else ALONE) for members in groups.values()]
    units.sort(key=lambda u: u[0][0])
    return units


def optimize(cfg: tune.TuneConfig, study, space: list[str], train, val, on_trial: Callable) -> None:
    """Ask, fit and tell batches of ``cfg.batch_trials`` trials until the study holds ``cfg.trials`` finished
    trials or ``cfg.timeout`` has passed (checked before each batch). ``on_trial(study, frozen_trial)`` is called
    after each trial is told (as Optuna's ``optimize`` callbacks)."""
    import optuna

    from dvml.cache import read_info

    feature_dim = read_info(cfg.cache).feature_dim
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    said: set[str] = set()
    while True:
        left = cfg.trials - tune._n_complete(study)
        if left <= 0 or (deadline is not None and time.monotonic() >= deadline):
            return
        trials = [study.ask() for _ in range(min(cfg.batch_trials, left))]
        told: set[int] = set()
        try:
            for trial, metrics, error in _run_batch(cfg, trials, space, train, val, feature_dim, said):
                if error is not None:
                    log.warning("trial %d failed: %s", trial.number, error)
                    frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    frozen = study.tell(trial, float(metrics[cfg.objective]))
                told.add(trial.number)
                on_trial(study, frozen)
        except BaseException:
            for trial in trials:
                if trial.number not in told:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise


def _run_batch(cfg, trials: list, space: list[str], train, val, feature_dim: int, said: set[str]
               ) -> Iterator[tuple]:
    """Fit and score ``trials``; yields ``(trial, metrics, None)`` or ``(trial, None, error)`` per trial, each
    trial's user attributes (metrics, seconds, trainer) set."""
    fit_cfgs = [tune.fit_config(cfg, tune.suggest(t, space), tune.trial_dir(cfg, t.number)) for t in trials]
    for unit, why in plan(fit_cfgs, feature_dim):
        if why is not None:
            (log.info if why in said else log.warning)("trial %d fitted one by one: %s", trials[unit[0]].number, why)
            said.add(why)
            yield _one(cfg, trials[unit[0]], fit_cfgs[unit[0]], train, val)
            continue
        yield from _stack(cfg, [trials[j] for j in unit], [fit_cfgs[j] for j in unit], train, val)


def _one(cfg, trial, fit_cfg: FitConfig, train, val) -> tuple:
    t0 = time.perf_counter()
    try:
        metrics = tune.fit_and_score(cfg, fit_cfg, train, val)
    except DvmlError as e:
        return trial, None, str(e)
    tune.record_trial(trial, metrics, time.perf_counter() - t0, "one-by-one")
    return trial, metrics, None


def _stack(cfg, trials: list, fit_cfgs: list[FitConfig], train, val) -> Iterator[tuple]:
    from dvml.heads.stacked import fit_stacked

    numbers = ", ".join(str(t.number) for t in trials)
    for c in fit_cfgs:
        tune.clear_run(c.out)
    t0 = time.perf_counter()
    try:
        fit_stacked(fit_cfgs, train=train, test=val)
    except DvmlError as e:  # a member diverged: refit each alone, so that only that trial fails
        log.warning("trials %s: the stacked fit failed (%s); fitting them one by one", numbers, e)
        for trial, c in zip(trials, fit_cfgs, strict=True):
            yield _one(cfg, trial, c, train, val)
        return
    except ValueError as e:  # a check of the stack itself: a bug, not the user's input
        raise DvmlError(f"stacked fit of trials {numbers}: {e}") from None
    share = (time.perf_counter() - t0) / len(trials)
    log.info("trials %s fitted as one stack", numbers)
    for trial, c in zip(trials, fit_cfgs, strict=True):
        t1 = time.perf_counter()
        try:
            metrics = tune.score(c.out, val, cfg.objective)
        finally:
            if not cfg.keep_runs:
                tune.clear_run(c.out)
        tune.record_trial(trial, metrics, share + time.perf_counter() - t1, "stacked")
        yield trial, metrics, None
