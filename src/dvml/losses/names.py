"""The metric losses by name and their parameters: the one place where a loss name or a default value is written.

:class:`LossName` is what ``--loss`` takes; :data:`LOSS_PARAM_DEFAULTS` lists, per loss, the parameters a fit
can set (``--margin``, ``--gamma``, ``--temperature``, ``--label-smoothing``) and the value each takes when not
given. :mod:`dvml.losses.metric` and :mod:`dvml.losses.dr` read their defaults from here.
"""

from __future__ import annotations

from enum import Enum


class LossName(str, Enum):
    """Metric losses selectable by name (see :mod:`dvml.losses.metric`)."""

    triplet = "triplet"  # paper eq. 2: squared euclidean distance, margin
    npair = "npair"  # paper eq. 3: N-pair, dot-product logits, 2 images per class
    triplet_dws = "triplet-dws"  # paper eq. 4: non-squared distance, distance-weighted sampling
    contrastive = "contrastive"
    lifted = "lifted"
    angular = "angular"
    proxy_nca = "proxy-nca"
    multi_similarity = "multi-similarity"
    proxy_anchor = "proxy-anchor"
    dr_triplet = "dr-triplet"  # direction-regularised triplet (dvml.losses.dr)
    dr_proxy_nca = "dr-proxy-nca"  # direction-regularised Proxy-NCA (dvml.losses.dr)
    proxy_nca_pp = "proxy-nca-pp"  # Proxy-NCA++ (dvml.losses.dr)


class MetricReduction(str, Enum):
    """How the triplet losses (triplet, triplet-dws) reduce over their triplets (``--metric-reduction``)."""

    nonzero = "nonzero"  # the mean over the triplets with a non-zero loss (pml's AvgNonZeroReducer)
    sum = "sum"  # the paper's eqs. 2 and 4
    mean = "mean"  # the plain mean over all triplets


class SyntheticPairs(str, Enum):
    """Which embeddings the synthetic term Lm(ẑ) pairs (``--synthetic-pairs``)."""

    within = "within"  # the paper's eq. 10: Lm over each synthetic batch alone, every pair synthetic
    cross = "cross"  # each real z_I as the anchor, its positives and negatives synthetic (z_I against ẑ_t)


#: Losses that take ``--synthetic-pairs cross`` (anchor-based pairs: the paper's three losses).
CROSS_PAIR_LOSSES = frozenset({LossName.triplet, LossName.triplet_dws, LossName.npair})
CROSS_PAIR_NAMES = ", ".join(sorted(n.value for n in CROSS_PAIR_LOSSES))  # for messages

#: Losses that compare raw, unnormalised embeddings (N-pair's dot-product logits, eq. 3); every other loss
#: L2-normalises its embeddings first (or compares them by cosine).
DOT_PRODUCT_LOSSES = frozenset({LossName.npair})

PROXY_LOSSES = frozenset({LossName.proxy_nca, LossName.proxy_anchor, LossName.dr_proxy_nca,
                          LossName.proxy_nca_pp})


#: Loss parameters a fit can set (``--margin``, ``--gamma``, ``--temperature``, ``--label-smoothing``), per loss,
#: with the default each takes when the option is not given (sources: :mod:`dvml.losses.metric`). A loss
#: takes exactly the parameters listed for it; one not listed here takes none.
LOSS_PARAM_DEFAULTS: dict[LossName, dict[str, float]] = {
    LossName.triplet: {"margin": 0.2},
    LossName.triplet_dws: {"margin": 0.2},
    LossName.contrastive: {"margin": 1.0},  # the negative margin (the positive margin is 0)
    LossName.lifted: {"margin": 1.0},  # the negative margin
    LossName.proxy_anchor: {"margin": 0.1},
    LossName.dr_triplet: {"margin": 0.278, "gamma": 0.492},  # seed 003's Optuna-tuned values
    # seed 003's reference: γ from its command line (--mvr_reg 0.45), no scale (temperature 1)
    LossName.dr_proxy_nca: {"gamma": 0.45, "temperature": 1.0},
    # Teh et al. 2020's loss; smoothing 0 as their official training calls it; τ = 1/4 chosen on held-out
    # training classes (their 1/9 saturates on dvml's linear heads; see dvml.losses.dr)
    LossName.proxy_nca_pp: {"temperature": 0.25, "label_smoothing": 0.0},
}
#: Softmax scale of proxy-nca (norm-3 embeddings and proxies: pml ProxyNCALoss's ``softmax_scale``); not a fit
#: option.
PROXY_NCA_SCALE = 9.0
LOSS_PARAM_NAMES = ("margin", "gamma", "temperature", "label_smoothing")
