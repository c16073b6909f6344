"""The metric losses, one entry each: the one place a loss is declared.

A :class:`LossSpec` holds everything dvml knows about a loss: its name, the factory that builds it with every
setting at construction, its parameters' defaults, and its traits (proxies, dot-product or normalised space,
cross pairs, DVML support, the paper's batch and reduction). :class:`~dvml.losses.names.LossName`, the trait
sets (``PROXY_LOSSES``, ``DOT_PRODUCT_LOSSES``, ``CROSS_PAIR_LOSSES``), ``LOSS_PARAM_DEFAULTS``,
:func:`~dvml.losses.metric.make_metric_loss`, the config's per-loss defaults and the CLI's ``--loss`` all read
this registry.

Adding a loss is one :func:`register_loss` call::

    register_loss(LossSpec("my-loss", factory=lambda num_classes, embedding_size, margin: MyLoss(margin),
                           params={"margin": 0.5}))

after which ``FitConfig(loss="my-loss", ...)`` and ``dvml fit-heads --loss my-loss`` fit it (register it before
the CLI parses its options, e.g. in a module the program imports first). A factory returns a
:class:`~dvml.losses.metric.MetricLoss` or a plain ``nn.Module`` with ``forward(embeddings (B, E), labels (B,))``
(wrapped to loop over the T synthetic batches). Its keyword arguments are the loss's parameters (resolved:
every one in ``params``) plus, if the spec lists them in ``settings``, ``reducer`` (a
:class:`~dvml.losses.names.MetricReduction`), ``fixed_triplets`` (bool: the paper's triplet input) and
``generator`` (a ``torch.Generator`` for the loss's own random draws).

The built-in entries import their implementations lazily (:mod:`dvml.losses.metric`, :mod:`dvml.losses.dr`,
pytorch-metric-learning), so reading the registry imports no loss code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dvml.errors import FieldError

#: Every loss parameter a fit can set (a field of the heads' config each); a spec's ``params`` is a subset.
LOSS_PARAM_NAMES = ("margin", "gamma", "temperature", "label_smoothing")
#: Construction settings a factory may take besides its parameters (listed in the spec's ``settings``).
LOSS_SETTINGS = ("reducer", "fixed_triplets", "generator")


@dataclass(frozen=True)
class LossSpec:
    """One metric loss.

    Attributes:
        name: the name ``loss`` takes (a config field value, the CLI's ``--loss``).
        factory: ``factory(num_classes, embedding_size, **params, **settings)`` → the loss module (see the module
            docstring).
        params: the parameters the loss takes (among :data:`LOSS_PARAM_NAMES`) and their defaults.
        settings: construction settings the factory takes (among :data:`LOSS_SETTINGS`).
        reference: optional ``reference(num_classes, embedding_size, **params) -> (pml loss, pml miner | None)``:
            the pytorch-metric-learning loss the implementation equals (tests compare them).
        proxies: holds trainable proxies (``nn.Parameter`` s, trained at ``proxy_lr``).
        dot_product: compares raw, unnormalised embeddings (z_V is then added to raw z_I); otherwise the loss
            L2-normalises its embeddings or compares them by cosine.
        cross_pairs: takes ``anchors`` (``synthetic_pairs="cross"``).
        dvml: can be the metric loss of DVML (takes T synthetic batches).
        summed: its paper sums over triplets: the default ``reduction`` is ``sum`` (else ``mean``).
        batch_size: the default images per batch.
        per_class: the default images per class in a batch.
        per_class_fixed: the loss takes exactly ``per_class`` images per class (N-pair's pairs).
        doc: one line for listings.
    """

    name: str
    factory: Callable[..., object]
    params: Mapping[str, float] = field(default_factory=dict)
    settings: frozenset[str] = frozenset()
    reference: Callable[..., tuple] | None = None
    proxies: bool = False
    dot_product: bool = False
    cross_pairs: bool = False
    dvml: bool = True
    summed: bool = False
    batch_size: int = 128
    per_class: int = 4
    per_class_fixed: bool = False
    doc: str = ""

    def __post_init__(self):
        unknown = set(self.params) - set(LOSS_PARAM_NAMES)
        if unknown:
            raise ValueError(f"loss {self.name}: unknown parameter(s) {sorted(unknown)} (known: "
                             f"{', '.join(LOSS_PARAM_NAMES)})")
        bad = set(self.settings) - set(LOSS_SETTINGS)
        if bad:
            raise ValueError(f"loss {self.name}: unknown setting(s) {sorted(bad)} (known: {', '.join(LOSS_SETTINGS)})")
        object.__setattr__(self, "params", MappingProxyType({k: float(v) for k, v in self.params.items()}))
        object.__setattr__(self, "settings", frozenset(self.settings))


_REGISTRY: dict[str, LossSpec] = {}


class LossKey(str):
    """The name of a loss registered after :class:`~dvml.losses.names.LossName` was built (a plug-in): a string
    with ``.value``, like a ``LossName`` member, so code reading ``cfg.loss.value`` works for both."""

    @property
    def value(self) -> str:
        return str(self)


def register_loss(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add ``spec`` to the registry (``replace``: over an entry of the same name). Returns it."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a loss named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_loss(name: str) -> None:
    """Remove a plug-in loss (a built-in one cannot be removed: :class:`LossName` holds it)."""
    from dvml.losses.names import LossName

    if name in LossName._value2member_map_:
        raise ValueError(f"{name} is a built-in loss")
    _REGISTRY.pop(name, None)


def loss_names() -> tuple[str, ...]:
    """The registered names, in registration order (built-in ones first)."""
    return tuple(_REGISTRY)


def loss_spec(name) -> LossSpec:
    """The entry of ``name`` (a :class:`LossName`, :class:`LossKey` or string); ``ValueError`` for an unknown one."""
    key = getattr(name, "value", name)
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise FieldError(f"`loss` must be one of {', '.join(_REGISTRY)}, got {key!r}") from None


def resolve_loss(name):
    """``name`` as the config holds it: the :class:`LossName` member of a built-in loss, a :class:`LossKey` for a
    plug-in; ``ValueError`` (naming the field ``loss`` and the choices) for an unknown name."""
    from dvml.losses.names import LossName

    key = loss_spec(name).name
    return LossName(key) if key in LossName._value2member_map_ else LossKey(key)


# -- the built-in losses -------------------------------------------------------------------------------------------


def _triplet(num_classes, embedding_size, *, margin, reducer=None, fixed_triplets=False, generator=None):
    from dvml.losses.metric import BatchedTripletLoss, MetricReduction

    return BatchedTripletLoss(margin=margin, squared=True, reducer=reducer or MetricReduction.nonzero,
                              fixed_triplets=fixed_triplets, generator=generator)


def _triplet_dws(num_classes, embedding_size, *, margin, reducer=None, generator=None):
    from dvml.losses.metric import BatchedTripletLoss, MetricReduction

    return BatchedTripletLoss(margin=margin, squared=False, dws=True, reducer=reducer or MetricReduction.nonzero,
                              generator=generator)


def _npair(num_classes, embedding_size):
    from dvml.losses.metric import NPAIR_L2_REG, BatchedNPairLoss

    return BatchedNPairLoss(NPAIR_L2_REG)


def _pml(flatten: bool = False):
    """A factory wrapping the spec's pytorch-metric-learning reference (+ miner) over the T batches."""

    def factory(num_classes, embedding_size, **params):
        from dvml.losses.metric import FlattenT, LoopOverT

        loss, miner = loss_spec(factory.name).reference(num_classes, embedding_size, **params)
        return FlattenT(loss) if flatten else LoopOverT(loss, miner)

    return factory


def _ref_triplet(power: int, miner: bool):
    def reference(num_classes, embedding_size, *, margin):
        from pytorch_metric_learning import distances, losses, miners

        from dvml.losses.metric import DWS_CUTOFF, DWS_NONZERO_LOSS_CUTOFF

        m = miners.DistanceWeightedMiner(cutoff=DWS_CUTOFF, nonzero_loss_cutoff=DWS_NONZERO_LOSS_CUTOFF)
        return losses.TripletMarginLoss(margin=margin, distance=distances.LpDistance(power=power)), (m if miner
                                                                                                     else None)
    return reference


def _ref_npair(num_classes, embedding_size):
    from pytorch_metric_learning import distances, losses, regularizers

    from dvml.losses.metric import NPAIR_L2_REG

    return losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False),
                             embedding_regularizer=regularizers.LpRegularizer(power=2),
                             embedding_reg_weight=NPAIR_L2_REG), None


def _ref_contrastive(num_classes, embedding_size, *, margin):
    from pytorch_metric_learning import losses

    return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin), None


def _ref_lifted(num_classes, embedding_size, *, margin):
    from pytorch_metric_learning import losses

    return losses.LiftedStructureLoss(neg_margin=margin, pos_margin=0.0), None


def _ref_angular(num_classes, embedding_size):
    from pytorch_metric_learning import losses

    return losses.AngularLoss(alpha=40), None


#: Softmax scale of proxy-nca (norm-3 embeddings and proxies: pml ProxyNCALoss's ``softmax_scale``); not a fit
#: option.
PROXY_NCA_SCALE = 9.0


def _ref_proxy_nca(num_classes, embedding_size):
    from pytorch_metric_learning import losses

    return losses.ProxyNCALoss(num_classes, embedding_size, softmax_scale=PROXY_NCA_SCALE), None


def _ref_multi_similarity(num_classes, embedding_size):
    from pytorch_metric_learning import losses, miners

    return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)


def _ref_proxy_anchor(num_classes, embedding_size, *, margin):
    from pytorch_metric_learning import losses

    return losses.ProxyAnchorLoss(num_classes, embedding_size, margin=margin, alpha=32), None


def _dr_triplet(num_classes, embedding_size, *, margin, gamma):
    from dvml.losses.dr import DRTripletLoss
    from dvml.losses.metric import ForwardBatched

    return ForwardBatched(DRTripletLoss(margin=margin, gamma=gamma))


def _dr_proxy_nca(num_classes, embedding_size, *, gamma, temperature):
    from dvml.losses.dr import DRProxyNCALoss
    from dvml.losses.metric import ForwardBatched

    return ForwardBatched(DRProxyNCALoss(num_classes, embedding_size, gamma=gamma, temperature=temperature))


def _proxy_nca_pp(num_classes, embedding_size, *, temperature, label_smoothing):
    from dvml.losses.dr import ProxyNCAPlusPlusLoss
    from dvml.losses.metric import ForwardBatched

    return ForwardBatched(ProxyNCAPlusPlusLoss(num_classes, embedding_size, temperature=temperature,
                                               label_smoothing=label_smoothing))


def _pml_spec(name: str, reference, *, flatten: bool = False, **kw) -> LossSpec:
    factory = _pml(flatten)
    factory.name = name
    return LossSpec(name, factory, reference=reference, **kw)


for _spec in (
    # paper eq. 2: squared euclidean distance, margin; the paper's triplet input takes 120 images
    LossSpec("triplet", _triplet, {"margin": 0.2}, settings={"reducer", "fixed_triplets", "generator"},
             reference=_ref_triplet(2, miner=False), cross_pairs=True, summed=True, batch_size=120,
             doc="triplet (paper eq. 2)"),
    # paper eq. 3: N-pair, dot-product logits, 2 images per class
    LossSpec("npair", _npair, reference=_ref_npair, dot_product=True, cross_pairs=True, per_class=2,
             per_class_fixed=True, doc="N-pair (paper eq. 3)"),
    # paper eq. 4: non-squared distance, distance-weighted sampling
    LossSpec("triplet-dws", _triplet_dws, {"margin": 0.2}, settings={"reducer", "generator"},
             reference=_ref_triplet(1, miner=True), cross_pairs=True, summed=True,
             doc="triplet with distance-weighted sampling (paper eq. 4)"),
    _pml_spec("contrastive", _ref_contrastive, params={"margin": 1.0}),  # the negative margin (positive: 0)
    _pml_spec("lifted", _ref_lifted, params={"margin": 1.0}),  # the negative margin
    _pml_spec("angular", _ref_angular),
    _pml_spec("proxy-nca", _ref_proxy_nca, flatten=True, proxies=True),
    _pml_spec("multi-similarity", _ref_multi_similarity),
    _pml_spec("proxy-anchor", _ref_proxy_anchor, params={"margin": 0.1}, proxies=True),
    # direction-regularised triplet (dvml.losses.dr): seed 003's Optuna-tuned values
    LossSpec("dr-triplet", _dr_triplet, {"margin": 0.278, "gamma": 0.492}),
    # direction-regularised Proxy-NCA: seed 003's reference, γ from its command line (--mvr_reg 0.45), no scale
    LossSpec("dr-proxy-nca", _dr_proxy_nca, {"gamma": 0.45, "temperature": 1.0}, proxies=True),
    # Teh et al. 2020's Proxy-NCA++; smoothing 0 as their official training calls it; τ = 1/4 chosen on held-out
    # training classes (their 1/9 saturates on dvml's linear heads; see dvml.losses.dr)
    LossSpec("proxy-nca-pp", _proxy_nca_pp, {"temperature": 0.25, "label_smoothing": 0.0}, proxies=True),
):
    register_loss(_spec)
del _spec
