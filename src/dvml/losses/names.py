"""The metric losses by name, derived from :mod:`dvml.losses.registry` (the one place a loss is declared).

:class:`LossName` is an enum of the built-in losses' names; the trait sets and :data:`LOSS_PARAM_DEFAULTS` are
views of the registry taken when this module is imported (a loss registered later is reached through
:func:`~dvml.losses.registry.loss_spec`, which every trainer uses).
"""

from __future__ import annotations

from enum import Enum

from dvml.losses.registry import LOSS_PARAM_NAMES, PROXY_NCA_SCALE, loss_names, loss_spec

#: Metric losses selectable by name: the built-in entries of :mod:`dvml.losses.registry` (member names with ``_``
#: for ``-``: ``LossName.triplet_dws`` is ``"triplet-dws"``).
LossName = Enum("LossName", [(n.replace("-", "_"), n) for n in loss_names()], type=str, module=__name__)
LossName.__doc__ = "Metric losses selectable by name (the built-in entries of :mod:`dvml.losses.registry`)."


class MetricReduction(str, Enum):
    """How the triplet losses (triplet, triplet-dws) reduce over their triplets (``--metric-reduction``)."""

    nonzero = "nonzero"  # the mean over the triplets with a non-zero loss (pml's AvgNonZeroReducer)
    sum = "sum"  # the paper's eqs. 2 and 4
    mean = "mean"  # the plain mean over all triplets


class SyntheticPairs(str, Enum):
    """Which embeddings the synthetic term Lm(ẑ) pairs (``--synthetic-pairs``)."""

    within = "within"  # the paper's eq. 10: Lm over each synthetic batch alone, every pair synthetic
    cross = "cross"  # each real z_I as the anchor, its positives and negatives synthetic (z_I against ẑ_t)


def _having(trait: str) -> frozenset:
    return frozenset(n for n in LossName if getattr(loss_spec(n), trait))


#: Losses that take ``synthetic_pairs="cross"`` (anchor-based pairs: the paper's three losses).
CROSS_PAIR_LOSSES = _having("cross_pairs")
CROSS_PAIR_NAMES = ", ".join(sorted(n.value for n in CROSS_PAIR_LOSSES))  # for messages
#: Losses that compare raw, unnormalised embeddings (N-pair's dot-product logits, eq. 3); every other loss
#: L2-normalises its embeddings first (or compares them by cosine).
DOT_PRODUCT_LOSSES = _having("dot_product")
PROXY_LOSSES = _having("proxies")
#: Loss parameters a fit can set, per loss, with the default each takes when not given. A loss takes exactly the
#: parameters listed for it; one not listed here takes none.
LOSS_PARAM_DEFAULTS: dict[LossName, dict[str, float]] = {n: dict(loss_spec(n).params) for n in LossName
                                                         if loss_spec(n).params}
__all__ = ["CROSS_PAIR_LOSSES", "CROSS_PAIR_NAMES", "DOT_PRODUCT_LOSSES", "LOSS_PARAM_DEFAULTS", "LOSS_PARAM_NAMES",
           "PROXY_LOSSES", "PROXY_NCA_SCALE", "LossName", "MetricReduction", "SyntheticPairs"]
