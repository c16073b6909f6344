"""The training core shared by :func:`dvml.heads.fit` and :func:`dvml.finetune.finetune`: what both trainers do
the same way, so each keeps only what differs (where x comes from, how a step is distributed, what is resumed).

* :class:`FitEvent` / :data:`Callback`: progress reports to the CLI.
* :func:`metric_loss`, :func:`dvml_loss`: the config's metric loss Lm and the four-term loss around it.
* :func:`optimizer`: Adam over (extra groups, heads, proxies): the heads at ``lr`` with ``weight_decay``, a proxy
  loss's proxies at ``proxy_lr`` without decay.
* :func:`check_out_dir`, :func:`check_resume_config`: the run directory against ``--resume`` / ``--overwrite``.
* :func:`start_log`: an empty ``log.jsonl``, or the one being resumed trimmed to the epochs kept.
* :func:`epoch_record`: one epoch's ``log.jsonl`` record (terms, phase, λ1, timing).
* :func:`non_finite_error`: the error that stops a run at its first non-finite loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from dvml import runs as R
from dvml.errors import DvmlError
from dvml.heads.config import HeadsConfig
from dvml.heads.model import Gather
from dvml.heads.objective import TERMS, DVMLLoss, metric_loss  # noqa: F401  (metric_loss: importable from here)
from dvml.losses import MetricLoss
from dvml.losses.registry import loss_spec


def dvml_loss(cfg: HeadsConfig, metric: MetricLoss, gather: Gather | None = None,
              target_mean: torch.Tensor | None = None, target_std: torch.Tensor | None = None) -> DVMLLoss:
    """The four-term loss of ``cfg`` around ``metric`` (:meth:`~dvml.heads.objective.DVMLLoss.from_config`)."""
    return DVMLLoss.from_config(cfg, metric=metric, gather=gather, target_mean=target_mean, target_std=target_std)


class FitEventKind(str, Enum):
    """What a :class:`FitEvent` reports."""

    start = "start"  # epoch = the first epoch to run, 0-based
    step = "step"  # step steps of epoch done
    epoch = "epoch"  # record = the epoch's log record
    end = "end"


@dataclass(frozen=True)
class FitEvent:
    """Progress report handed to a trainer's callback (``kind``: :class:`FitEventKind`, or its value)."""

    kind: FitEventKind
    epoch: int
    epochs: int
    step: int
    steps: int
    record: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", FitEventKind(self.kind))


Callback = Callable[[FitEvent], None]


def optimizer(cfg, heads: Iterable[torch.nn.Parameter], loss_params: list[torch.nn.Parameter], *,
              before: Sequence[dict] = (), fused: bool = False) -> torch.optim.Adam:
    """Adam over ``before`` (e.g. the backbone's group), the heads (``cfg.lr``, ``cfg.weight_decay``) and the
    loss's parameters (``cfg.proxy_lr``, no decay). ``fused`` tries the one-kernel-per-step implementation.

    Raises:
        DvmlError: ``cfg.loss`` is a proxy loss whose module has no parameters.
    """
    groups = [*before, {"params": list(heads), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.proxy_lr, "weight_decay": 0.0})
    elif loss_spec(cfg.loss).proxies:
        raise DvmlError(f"`loss` {cfg.loss.value}: the loss module has no proxies to train")
    if fused:
        try:  # one fused kernel per step instead of ~10 elementwise passes per parameter
            return torch.optim.Adam(groups, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.Adam(groups)


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DvmlError(f"`out` {out}: exists and is not a directory")


def check_resume_config(out: Path, old: dict, new: dict) -> None:
    """Refuse ``--resume`` when what is trained differs (``old``: the run's model dict, ``new``: this one's)."""
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if diff:
        raise DvmlError(f"{out}: `resume` with a different config ({'; '.join(diff)}); rerun with the original "
                        "options or use `overwrite`")


def start_log(out: Path, resumed_epoch: int | None) -> None:
    """A new run's empty ``log.jsonl``, or a resumed run's without the records after ``resumed_epoch``."""
    if resumed_epoch is None:
        R.write_log(out, [])
    else:
        R.write_log(out, [r for r in R.read_log(out) if r.get("epoch", 0) <= resumed_epoch])


def epoch_record(cfg, epoch: int, means: Sequence[float], seconds: float, samples_per_s: float, *,
                 digits: int = 1, **extra) -> dict:
    """The ``log.jsonl`` record of 0-based ``epoch``: phase, the mean of every term (:data:`TERMS`), λ1 at the
    epoch's start, ``extra`` (e.g. the global step), seconds and samples per second (``digits`` decimals)."""
    lam = cfg.lambdas(epoch)
    return {"epoch": epoch + 1, "phase": lam.phase if cfg.dvml else 0,
            **{k: float(v) for k, v in zip(TERMS, means, strict=True)},
            "lambda_kl": lam.kl if cfg.dvml else 0.0, **extra, "seconds": float(f"{seconds:.4f}"),
            "samples_per_s": float(f"{samples_per_s:.{digits}f}")}


def non_finite_error(epoch: int, step: int, steps: int, detail: str, kept: str, hint: str) -> DvmlError:
    """``non-finite loss at epoch E, step S of N (detail); the last good checkpoint ... is kept in ...; hint``
    (epoch and step 1-based)."""
    return DvmlError(f"non-finite loss at epoch {epoch}, step {step} of {steps} ({detail}); the last {kept}; {hint}")
