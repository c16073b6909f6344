"""How an ablation runs its cells: stacked where they can be (:mod:`dvml.heads.stacked`), one by one otherwise.

Cells whose fits differ only in their seed (same loss, same method, same fit options; in general, only in
:data:`dvml.heads.stacked.MEMBER_FIELDS`) form a *group*; a group is cut into stacks of at most ``stack_size``
cells, each trained as one stacked model. A cell whose fit cannot be stacked (:func:`dvml.heads.stacked.stack_reason`),
would not gain from it (:func:`cpu_reason`: large DVML heads on the CPU), or would be alone in its stack, runs one by
one as with ``--no-stack``, and the reason is logged (a warning). Every cell ends as it does one by one: its run
directory, ``heads.pt``, ``log.jsonl``, then ``metrics.json`` written last (which marks it finished); its
``config.json`` says which trainer ran (``"trainer"``). A stack's fit time is shared equally by its cells
(``fit_seconds``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dvml import files
from dvml.errors import DvmlError
from dvml.heads.stacked import fit_stacked, group_key, stack_reason

log = logging.getLogger(__name__)


#: On the CPU, a DVML fit whose decoder sees more than this many activations per step (T · batch · max(D, hidden))
#: is arithmetic- and memory-bound: stacked, it measured 0.80-0.87x the one-by-one speed at CUB's size (T 20, batch
#: 120, D 1024: 2.5M), against 1.06-1.19x on the demo's (0.6M) (bench/ablate_grid.py). Such cells run one by one there.
CPU_STACK_MAX_ACTIVATIONS = 1_000_000


def cpu_reason(fit_cfg, feature_dim: int) -> str | None:
    """Why stacking ``fit_cfg`` would not pay on its device (the CPU, large DVML heads), or None."""
    from dvml.heads.train import resolve_device

    if not fit_cfg.dvml or resolve_device(fit_cfg.device).type != "cpu":
        return None
    acts = fit_cfg.samples * fit_cfg.batch_size * max(feature_dim, fit_cfg.decoder_hidden)
    if acts <= CPU_STACK_MAX_ACTIVATIONS:
        return None
    return (f"on the CPU a DVML fit of {acts:,} decoder activations per step is arithmetic-bound and measured slower "
            f"stacked (limit {CPU_STACK_MAX_ACTIVATIONS:,})")


def plan(cfg, cells: list) -> list[tuple[list, str | None]]:
    """``cfg``'s cells (an :class:`~dvml.experiments.ablate.AblateConfig` and cells to run, in grid order) as the
    units they run in, in order of each unit's first cell: ``(cells, None)`` for a stack, ``([cell], reason)``
    for a cell fitted one by one."""
    from dvml.experiments import ablate

    if not cfg.stack:
        return [([c], "--no-stack") for c in cells]
    from dvml.cache import read_info

    feature_dim = read_info(cfg.cache).feature_dim
    groups: dict[tuple, list] = {}
    alone: dict = {}
    for c in cells:
        fit_cfg = ablate._fit_config(cfg, c, ablate.run_dir(cfg, c))
        why = stack_reason(fit_cfg) or cpu_reason(fit_cfg, feature_dim)
        if why:
            alone[c] = why
        else:
            groups.setdefault(group_key(fit_cfg), []).append(c)
    units: list[tuple[list, str | None]] = []
    for members in groups.values():
        for i in range(0, len(members), cfg.stack_size):
            chunk = members[i:i + cfg.stack_size]
            if len(chunk) == 1:
                alone[chunk[0]] = "no other cell to stack it with"
            else:
                units.append((chunk, None))
    units += [([c], why) for c, why in alone.items()]
    units.sort(key=lambda u: cells.index(u[0][0]))
    return units


def run_cells(cfg, cells: list, train, test, callback: Callable, run_one: Callable) -> Iterator[tuple]:
    """Run ``cells`` of ``cfg`` (stacked where :func:`plan` says), yielding ``(cell, row)`` as each finishes.

    ``run_one(cfg, cell, train, test, callback) -> row`` fits and evaluates one cell one by one; ``callback``
    receives the ablation's events (``cell_start``, ``epoch``) for every cell.
    """
    from dvml.experiments import ablate

    units = plan(cfg, cells)
    fallback: dict[str, list[str]] = {}
    for unit, why in units:
        if why is not None and why != "--no-stack":
            fallback.setdefault(why, []).append(unit[0].name)
    for why, names in fallback.items():
        log.warning("fitted one by one (%s): %s", why, ", ".join(names))
    for unit, why in units:
        if why is not None:
            callback(ablate.AblateEvent("cell_start", cell=unit[0]))
            yield unit[0], run_one(cfg, unit[0], train, test, callback)
            continue
        yield from _run_stack(cfg, unit, train, test, callback)


def _run_stack(cfg, unit: list, train, test, callback: Callable) -> Iterator[tuple]:
    from dvml.experiments import ablate

    fit_cfgs = []
    for cell in unit:
        run = ablate.run_dir(cfg, cell)
        if run.exists():  # an unfinished cell: start it over, as one by one
            log.info("%s: unfinished, refitting from scratch", cell.name)
            shutil.rmtree(run)
        files.make_dir(run.parent)
        fit_cfgs.append(ablate._fit_config(cfg, cell, run))
        callback(ablate.AblateEvent("cell_start", cell=cell))

    def on_fit(i: int, ev) -> None:
        if ev.kind in ("step", "epoch"):
            info = {"epoch": ev.epoch + 1 if ev.kind == "step" else ev.epoch, "epochs": ev.epochs,
                    "step": ev.step, "steps": ev.steps, "kind": ev.kind}
            if ev.record:
                info.update(ev.record)
            callback(ablate.AblateEvent("epoch", cell=unit[i], info=info))

    t0 = time.perf_counter()
    try:
        fit_stacked(fit_cfgs, train=train, test=test, callback=on_fit)
    except ValueError as e:  # a check of the stack itself: a bug, not the user's input
        raise DvmlError(f"stacked fit of {', '.join(c.name for c in unit)}: {e}") from None
    share = (time.perf_counter() - t0) / len(unit)
    for cell, fit_cfg in zip(unit, fit_cfgs, strict=True):
        yield cell, ablate._evaluate_cell(cfg, cell, fit_cfg.out, share)


def trainer_counts(rows: list[dict]) -> dict[str, int]:
    """How many of the ablation's finished cells (rows with ``run_dir``) each trainer fitted, from their
    ``config.json`` (``"stacked"``, ``"one-by-one"``; ``"unknown"`` for a run recorded before the field)."""
    from dvml import runs as R

    counts: dict[str, int] = {}
    for r in rows:
        try:
            trainer = json.loads((Path(r["run_dir"]) / R.CONFIG_FILE).read_text()).get("trainer", "unknown")
        except (OSError, ValueError):
            trainer = "unknown"
        counts[trainer] = counts.get(trainer, 0) + 1
    return counts
