"""Seeds: the global RNGs, the seeds derived from a run's seed, and the one rule that holds out classes.

Every random stream of a run derives from its ``seed`` here, so two modules never pick different things for the
same seed: :func:`hold_out_classes` is what ``fit-heads --val-classes`` and ``dvml tune`` both use.
"""

from __future__ import annotations

import random

import numpy as np

from dvml._lazy import lazy_module

torch = lazy_module("torch")  # imported on first use: the CLI's option declarations import this module

#: Offsets of the derived seeds (``seed + offset``): the z_V / DWS noise generator and the held-out classes.
NOISE_SEED_OFFSET = 1
HOLD_OUT_SEED_OFFSET = 7919
#: Offsets of the diagnostics' own seeds (their image subset and noise): streams the fit itself never draws from.
DIAG_SUBSET_SEED_OFFSET = 104729
DIAG_NOISE_SEED_OFFSET = 15485863


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def noise_seed(seed: int) -> int:
    """Seed of a heads fit's device generator (z_V noise, DWS draws)."""
    return seed + NOISE_SEED_OFFSET


def proxy_seed(seed: int) -> int:
    """Seed of a fit's proxy initialisation: a stream of its own (not the one ``torch.manual_seed(seed)`` gives the
    layers), so the proxies depend on the seed alone — the same for a baseline and a DVML fit."""
    return int(np.random.SeedSequence([int(seed), 0x70726F78]).generate_state(1)[0])


def diag_seeds(seed: int) -> tuple[int, int]:
    """(image subset, noise) seeds of a heads fit's per-epoch diagnostics (:mod:`dvml.heads.diagnostics`)."""
    return seed + DIAG_SUBSET_SEED_OFFSET, seed + DIAG_NOISE_SEED_OFFSET


def step_seed(seed: int, step: int) -> int:
    """Seed of finetune's per-step generator: a function of (seed, global step) only, so the noise does not
    depend on the number of processes or the resume point."""
    return int(np.random.SeedSequence([seed, 0xD7, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def hold_out_classes(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold ``k`` whole classes out of ``labels`` (a seeded choice).

    Args:
        labels: (N,) class labels.
        k: number of classes to hold out, ``0 <= k <= number of classes``.
        seed: the run's seed (the choice uses ``seed + HOLD_OUT_SEED_OFFSET``).
    Returns:
        (kept classes, held-out classes), both sorted, disjoint, covering every class.
    """
    classes = np.unique(labels)
    if not 0 <= k <= classes.size:
        raise ValueError(f"cannot hold out {k} of {classes.size} classes")
    g = torch.Generator().manual_seed(seed + HOLD_OUT_SEED_OFFSET)
    held = np.sort(classes[torch.randperm(len(classes), generator=g)[:k].numpy()])
    return np.setdiff1d(classes, held), held
