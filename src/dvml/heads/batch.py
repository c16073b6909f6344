"""The batch against the data: fit the default batch to a small data set, refuse a given one that cannot be met.

A class-balanced batch of ``batch_size`` images holds ``per_class`` images of each of
``batch_size // per_class`` distinct classes, drawn among the training classes with at least two images
(:class:`~dvml.heads.sampler.ClassBalancedSampler`). The paper's batch (120 for triplet, 128 otherwise) needs
30 or 32 such classes at 4 per class; a folder data set of 22 classes could never be fitted with the defaults.

Rule: when ``batch_size`` was **not given**, a data set with fewer eligible classes than the default batch
needs gets ``eligible × per_class`` (all its classes in every batch), logged and recorded in the run's
``config.json`` (``batch``); a ``batch_size`` that **was given** and cannot be met is an error naming the
numbers and the options that fix it (spelt as the calling command has them).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TypeVar

import numpy as np

from dvml.errors import DvmlError, render_fields
from dvml.heads.config import HeadsConfig
from dvml.heads.sampler import drawable
from dvml.losses.registry import loss_spec
from dvml.seeding import hold_out_classes

log = logging.getLogger(__name__)

C = TypeVar("C", bound=HeadsConfig)  # FitConfig or FinetuneConfig


def batch_size_given(cfg: HeadsConfig) -> bool:
    """Whether ``cfg.batch_size`` was chosen by the user (else it is the loss's default, resolved)."""
    return cfg.batch_size_given


def eligible_classes(labels: np.ndarray, per_class: int = 2, views: int | None = None) -> int:
    """Number of classes a class-balanced batch can draw (:func:`dvml.heads.sampler.drawable`: at least two
    images and, for a feature cache with ``views`` views per image, ``per_class`` distinct (image, view) pairs)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return int(drawable(counts, per_class, views).sum())


def fitting_labels(cfg: HeadsConfig, labels: np.ndarray) -> np.ndarray:
    """The training labels the sampler will see: without the ``val_classes`` held out (same seeded rule)."""
    labels = np.asarray(labels)
    k = getattr(cfg, "val_classes", 0)  # fit-heads only
    if k and k < np.unique(labels).size:
        _, held = hold_out_classes(labels, k, cfg.seed)
        labels = labels[~np.isin(labels, held)]
    return labels


def _fixes(cfg: HeadsConfig, n: int, batch_option: str, per_class_option: str) -> str:
    fixes = [f"lower {batch_option} to {n * cfg.per_class} or less", f"leave {batch_option} out to fit the batch "
             "to the data"]
    if not loss_spec(cfg.loss).per_class_fixed:  # e.g. npair's per_class is fixed at 2 (its pairs)
        ms = [m for m in range(cfg.per_class + 1, cfg.batch_size // 2 + 1)
              if cfg.batch_size % m == 0 and cfg.batch_size // m <= n]
        if ms:
            fixes.insert(1, f"raise the images per class ({per_class_option.format(ms[0])})")
    return "; ".join(fixes)


def fit_batch(cfg: C, labels: np.ndarray, *, where: str = "", batch_option: str = "`batch_size`",
              per_class_option: str = "`per_class` {}", multiple_of: int = 1,
              views: int | None = None) -> tuple[C, dict]:
    """``cfg`` with its batch fitted to ``labels`` (the training split's labels, before any hold-out).

    Returns:
        ``(cfg', note)``: ``cfg'`` is ``cfg`` or a copy with a smaller ``batch_size``; ``note`` is what the run
        records: ``{"batch_size", "per_class", "source": "given" | "default" | "fitted", "classes"
        (eligible), "default" (when fitted)}``.
    Raises:
        DvmlError: a given ``batch_size`` needs more eligible classes than the data has, or fewer than 2 are
            eligible. ``batch_option`` / ``per_class_option`` name the fields (marked as :mod:`dvml.errors` says)
            (a format string, e.g. ``--set per-class={}`` for ablate). ``multiple_of``: a fitted batch is a
            multiple of this (finetune's global batch is split over that many processes). ``views``: views per
            image of a feature cache (fit-heads), so classes without ``per_class`` distinct (image, view) pairs
            do not count (as the sampler never draws them).
    """
    n = eligible_classes(fitting_labels(cfg, labels), cfg.per_class, views)
    k = cfg.classes_per_batch
    prefix = f"{where}: " if where else ""
    given = batch_size_given(cfg)
    if n < 2:
        need = "2 images" if views is None else f"2 images and {cfg.per_class} distinct (image, view) pairs"
        hint = ""
        if views is not None and eligible_classes(fitting_labels(cfg, labels), 2, None) >= 2:
            hint = (f" (images per class x {views} views is below {cfg.per_class}: lower "
                    f"{per_class_option.format('K')})")
        raise DvmlError(f"{prefix}{n} training class(es) with >= {need}; a class-balanced batch needs at least 2"
                        f"{hint}")
    if k <= n:
        return cfg, {"batch_size": cfg.batch_size, "per_class": cfg.per_class, "classes": n,
                     "source": "given" if given else "default"}
    if given:
        raise DvmlError(f"{prefix}a batch of {cfg.batch_size} with {cfg.per_class} images per class needs {k} "
                        f"training classes with >= 2 images, but there are {n}: "
                        f"{_fixes(cfg, n, batch_option, per_class_option)}")
    k_fit = n
    while k_fit >= 2 and (k_fit * cfg.per_class) % multiple_of:
        k_fit -= 1
    if k_fit < 2:
        raise DvmlError(f"{prefix}{n} training classes x {cfg.per_class} images per class cannot be split evenly "
                        f"over {multiple_of} processes; pass {batch_option}")
    fitted = dataclasses.replace(cfg, batch_size=k_fit * cfg.per_class)
    object.__setattr__(fitted, "batch_size_given", False)  # replace() re-derives it from the int batch_size
    log.warning("%sbatch fitted to the data: %d training classes x %d images per class = %d images (the default "
                "%d needs %d classes); pass %s to choose", prefix, k_fit, cfg.per_class, fitted.batch_size,
                cfg.batch_size, k, render_fields(batch_option))
    return fitted, {"batch_size": fitted.batch_size, "per_class": cfg.per_class, "classes": n, "source": "fitted",
                    "default": cfg.batch_size}
