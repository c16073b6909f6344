"""Warnings about a fit's schedule that a user would not see otherwise: a DVML fit whose phase 2 never starts
(``phase2_epoch >= epochs``: the decoder's gradient never reaches z_I and the phase-2 weights go unused), or
whose KL warm-up never ends (``kl_warmup_epochs > epochs``: λ1 never reaches its phase value).

Said once at the start of a fit (logger ``dvml.heads.schedule``) and recorded in the run's ``config.json``
(``"warnings"``); a grid of fits (ablate, tune) says them once for the grid.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def schedule_warnings(cfg) -> list[str]:
    """The warning of a :class:`~dvml.heads.config.HeadsConfig` (any config with ``dvml``, ``epochs``,
    ``phase2_epoch`` and ``kl_warmup_epochs``), one text naming the fields and their values, or [] when the
    schedule is whole.

    >>> from types import SimpleNamespace as C
    >>> schedule_warnings(C(dvml=True, epochs=10, phase2_epoch=30, kl_warmup_epochs=5))[0][:45]
    'phase 2 never starts: phase2_epoch 30 >= epoc'
    >>> schedule_warnings(C(dvml=False, epochs=10, phase2_epoch=30, kl_warmup_epochs=30))
    []
    """
    if not cfg.dvml:  # the baseline has no decoder and no KL: neither number changes what it trains
        return []
    what, why, fix = [], [], []
    if cfg.phase2_epoch >= cfg.epochs:
        what.append("phase 2 never starts")
        why.append(f"phase2_epoch {cfg.phase2_epoch} >= epochs {cfg.epochs}: the whole fit stays in phase 1 (the "
                   "decoder's gradient never reaches z_I, the phase-2 weights are unused)")
        fix.append("phase2_epoch below epochs")
    if cfg.kl_warmup_epochs > cfg.epochs:
        what.append("the KL warm-up never ends")
        why.append(f"kl_warmup_epochs {cfg.kl_warmup_epochs} > epochs {cfg.epochs}: the KL weight reaches only "
                   f"{cfg.epochs / cfg.kl_warmup_epochs:.0%} of its value")
        fix.append("kl_warmup_epochs to at most epochs")
    if not what:
        return []
    return [f"{' and '.join(what)}: {'; '.join(why)}. Lower {' and '.join(fix)} for the schedule the defaults "
            "assume"]


def warn_schedule(cfg) -> list[str]:
    """Log :func:`schedule_warnings` (once each) and return them (for the run's config.json)."""
    notes = schedule_warnings(cfg)
    for note in notes:
        log.warning("%s", note)
    return notes
