"""Configuration of a heads fit: :class:`FitConfig` (frozen, validated once) and the λ/phase schedule;
:class:`HeadsConfig`, its head-training part, is also the base of finetune's config.

The paper's settings (section 3.5) are the defaults: embedding size 512, T = 20 synthetic draws, Adam with
lr 1e-4, λ = (1, 1, 0.1, 1) in phase 1 and (0.8, 1, 0.2, 0.8) in phase 2, the sums of eqs. 2, 4, 8 and 9,
batch 120 for the triplet loss and 128 for every other loss; the phase-2 weights are the paper's because the
written protocol (docs/protocol.md, :data:`PHASE2_LAMBDAS`) chose them. Three defaults deviate from the paper, by
measurement (the README's deviation table; docs/history.md): the reconstruction likelihood is calibrated
(``likelihood="gaussian"``); z_V is added where the metric loss compares embeddings, at the class's scale
(``variance_space``: the unit sphere, raw z_I for N-pair; ``variance_scale``); and Lm(ẑ) does not train μ and σ
(``metric_grad_to_variance``). The paper's forms are options (fit-heads and finetune alike). What the paper leaves open
has a documented default here:
when phase 2 starts (``phase2_epoch``), the KL warm-up (λ1 ramped linearly from 0 over the first
``kl_warmup_epochs`` epochs, as in the implementation summary ``000_…``), the number of epochs, the
images per class in a batch, and the proxies' learning rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from dvml.config_fields import DIAGNOSTICS_PANEL, LOSS_PANEL, OBJECTIVE_PANEL, SCHEDULE_PANEL, option
from dvml.errors import FieldError
from dvml.losses.names import (
    CROSS_PAIR_NAMES,
    LOSS_PARAM_DEFAULTS,
    LOSS_PARAM_NAMES,
    LossName,
    MetricReduction,
    SyntheticPairs,
)
from dvml.losses.registry import loss_spec, resolve_loss


class Reduction(str, Enum):
    """How the two variational terms are reduced over their vector dimension (KL over E, recon over D)."""

    sum = "sum"  # the paper's eqs. 8-9 (KL over E, recon over D) and 2/4 (triplet losses over their triplets)
    mean = "mean"  # per dimension (KL, recon) and per non-zero triplet


class Likelihood(str, Enum):
    """The reconstruction term's form (:func:`~dvml.heads.objective.recon_term`)."""

    l2 = "l2"  # the paper's ‖x − x̂‖² (eq. 9)
    gaussian = "gaussian"  # −log N(x; x̂, s²I) at the batch's maximum-likelihood s² (calibrated decoder)


class VarianceSpace(str, Enum):
    """Where z_V is added (:class:`~dvml.heads.model.DVMLHeads`)."""

    raw = "raw"  # the paper: ẑ = z_I + s·z_V
    normalized = "normalized"  # ẑ = z_I/‖z_I‖ + s·z_V, on the unit sphere where the metric losses compare


class VarianceScale(str, Enum):
    """The factor s of z_V (:meth:`~dvml.heads.model.DVMLHeads.zv_scale`)."""

    unit = "unit"  # the paper: s = 1 (times variance_kappa)
    class_ = "class"  # the batch's pooled within-class standard deviation per dimension (times variance_kappa)


class VarianceSource(str, Enum):
    """Where z_V comes from (:class:`~dvml.heads.model.DVMLHeads`)."""

    learned = "learned"  # DVML: z_V ~ q(z_V | x) = N(μ(x), σ²(x)), the encoder's posterior
    noise = "noise"  # the control arm: z_V ~ N(0, I), no encoder (μ ≡ 0, σ ≡ 1: the KL is 0), same scale s


class Preset(str, Enum):
    """A named set of fit-heads defaults (:mod:`dvml.heads.presets`)."""

    paper = "paper"  # every setting as the paper has it
    dvml = "dvml"  # fit-heads' own defaults


class DeviceChoice(str, Enum):
    """Where the features live and the heads train: ``auto`` = CUDA, then Apple-silicon MPS, then the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Lambdas(NamedTuple):
    """Weights of the four DVML terms at one step, and whether the decoder's gradient is stopped.

    kl: λ1 (KL, after warm-up), recon: λ2, synthetic: λ3 (Lm(ẑ)), invariant: λ4 (Lm(z_I)).
    stop_recon_grad: phase 1 — the reconstruction gradient does not reach the embedding layer.
    """

    kl: float
    recon: float
    synthetic: float
    invariant: float
    stop_recon_grad: bool
    phase: int


PHASE1_LAMBDAS = (1.0, 1.0, 0.1, 1.0)
#: The paper's phase-2 weights (λ1 KL, λ2 recon, λ3 Lm(ẑ), λ4 Lm(z_I)) and reconstruction share k.
PAPER_PHASE2_LAMBDAS = (0.8, 1.0, 0.2, 0.8)
PAPER_RECON_SHARE = 1.0
#: fit-heads' phase-2 defaults, chosen by the written protocol (``python -m dvml.experiments.protocols.defaults``,
#: docs/protocol.md; its decision file: results/protocol-defaults/decision.json): among the paper's weights, dvml's
#: earlier (0.8, 1, 3.2, 0.8; k = 4) and a middle candidate, on validation classes held out of the training split
#: of three development sets at two schedules, 3 seeds, the best (the earlier, +0.32 points of validation
#: Recall@1 on average) was within the rule's half a point of the paper's: the paper's weights stay.
PHASE2_LAMBDAS = PAPER_PHASE2_LAMBDAS
DEFAULT_RECON_SHARE = PAPER_RECON_SHARE
#: How a recorded config (fit-heads' or finetune's) without these fields trained: ``recon_share`` is recorded only
#: since it exists, and runs from before that field had the paper's phase-2 weights. JSON form, as recorded.
LEGACY_PHASE2_FIELDS = {"recon_share": PAPER_RECON_SHARE, "lambdas_phase2": list(PAPER_PHASE2_LAMBDAS)}
#: Learning rate of a proxy loss's proxies, whatever the heads' lr (docs/history.md, "Proxy losses"). Was
#: 100 × lr (Proxy-Anchor's recipe; 0.01 at the default lr 1e-4): on the demo world's 10 steps an epoch
#: ``proxy-nca-pp`` was still converging at epoch 60 and trailed triplet by 2.7 / 3.1 test points (baseline / DVML).
#: Chosen on validation classes of the training split at the default schedule: demo world 0.675 / 0.678 → 0.731 /
#: 0.731 (seeds 0 / 1), wordnet_dev 0.891 → 0.880, the synth world 0.793 → 0.797. At ``dvml demo``'s lr 1e-3 it
#: equals the old rule.
DEFAULT_PROXY_LR = 0.1
#: The real-valued options of the heads, refused when not finite (NaN/inf would only show up as a NaN loss).
FLOAT_FIELDS = ("recon_share", "free_bits", "variance_kappa", "lr", "proxy_lr", "weight_decay", "margin", "gamma",
                "temperature", "label_smoothing")

#: Fields of the run configs (:class:`FitConfig`, :class:`~dvml.finetune.config.FinetuneConfig`) that control how a
#: run is executed, not what is trained: they may differ on resume and are not part of the model config
#: (``model_dict``). ``cache`` and ``root`` may move: the cache's fingerprint / the dataset's index digest is checked
#: instead.
CONTROL_FIELDS = frozenset({"cache", "root", "out", "resume", "overwrite", "device", "epochs", "eval_every",
                            "diag_images", "grad_every", "workers", "checkpoint_every"})
#: Metadata of a field that is derived, not chosen: not recorded (:func:`plain_dict`), not compared.
DERIVED = {"recorded": False}


def set_choice(config, name: str, choices: type[Enum]) -> None:
    """Set the field ``name`` of the frozen ``config`` to the member of ``choices`` its value (member or string)
    names; a ValueError naming the option and its choices otherwise."""
    value = getattr(config, name)
    try:
        object.__setattr__(config, name, choices(value))
    except ValueError:
        raise FieldError(f"`{name}` must be one of {', '.join(m.value for m in choices)}, got {value!r}") from None


#: The fields of :class:`HeadsConfig` that are :class:`~dvml.heads.model.DVMLHeads`' keyword arguments after
#: ``in_dim`` (sizes and the variance branch's options).
HEADS_KWARGS = ("embedding_size", "decoder_hidden", "dvml", "variance_space", "variance_scale", "variance_kappa",
                "metric_grad_to_variance", "centre_mu")


def config_fields(cls) -> tuple:
    """The fields of a config dataclass that are set (its ``__init__``'s), without the derived ones."""
    return tuple(f for f in fields(cls) if f.init)


def plain_dict(config) -> dict:
    """A config dataclass as JSON-ready python: ``asdict`` with paths and enums as strings, tuples as lists."""
    d = asdict(config)
    for f in fields(config):
        if not f.metadata.get("recorded", True):
            del d[f.name]
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, Enum):
            d[k] = v.value
        elif isinstance(v, tuple):
            d[k] = list(v)
        elif isinstance(v, str):  # a plug-in loss's LossKey: a plain string in what is recorded
            d[k] = str(v)
    return d


def default_batch_size(loss: LossName) -> int:
    """The loss's registry default: the paper's 120 for the triplet input, 128 for pair- and batch-based losses."""
    return loss_spec(loss).batch_size


#: Losses whose paper definition sums over triplets (eqs. 2 and 4): ``reduction=None`` resolves to ``sum`` for them.
SUMMED_LOSSES = frozenset(n for n in LossName if loss_spec(n).summed)


def default_reduction(loss: LossName) -> Reduction:
    """``sum`` (the paper's eqs. 2, 4, 8, 9) for the triplet losses; ``mean`` for every loss that averages over
    its pairs or samples (N-pair's eq. 3, the proxy and pml losses): summed ELBO terms (nats per image) next to a
    per-pair mean swamp the metric loss (measured: DVML+N-pair Recall@1 −22 points on the demo world)."""
    return Reduction.sum if loss_spec(loss).summed else Reduction.mean


def default_variance_space(loss: LossName) -> VarianceSpace:
    """Where z_V is added by default: in the space the metric loss compares embeddings in — the unit sphere
    (``normalized``) for the losses that L2-normalise, raw z_I for the dot-product losses (N-pair)."""
    return VarianceSpace.raw if loss_spec(loss).dot_product else VarianceSpace.normalized


def default_per_class(loss: LossName) -> int:
    """Images per class in a batch (the registry's): N-pair needs exactly its pairs (2); 4 otherwise."""
    return loss_spec(loss).per_class


def loss_param_help(name: str) -> str:
    """Help text of a loss parameter's option: which losses take it and their defaults."""
    uses = ", ".join(f"{loss.value} {p[name]:.4g}" for loss, p in LOSS_PARAM_DEFAULTS.items() if name in p)
    return f"Loss parameter, only for: {uses} (the defaults)."


_LAMBDAS_HELP = "weights: KL, recon, Lm(z_hat), Lm(z_I)."
#: The options of ``resume`` / ``overwrite``, declared once for the run configs that have them (fit-heads, finetune).
RESUME_OPTION = option("Continue an interrupted run in --out.")
OVERWRITE_OPTION = option("Replace a run already in --out (kept in OUT/.replaced-run until the new one finishes; back "
                          "in place if it fails before its first checkpoint).")


@dataclass(frozen=True)
class HeadsConfig:
    """What trains the heads: the loss, the DVML objective and its schedule, the optimiser, the batches, the seed.
    The base of :class:`FitConfig` and :class:`~dvml.finetune.config.FinetuneConfig` (one set of fields,
    defaults, rules and messages). Validated in ``__post_init__``; ``None`` fields get resolved.

    Attributes:
        loss: metric loss Lm.
        dvml: False = the baseline: the same embedding layer trained with Lm(z_I) alone (``--no-dvml``).
        embedding_size: E, size of z_I, μ and log σ².
        decoder_hidden: hidden width of the two-layer decoder (the paper: 512).
        samples: T, reparameterised draws of z_V per image and step.
        epochs: training epochs; one epoch = ``N_train // batch_size`` class-balanced batches.
        phase2_epoch: first (0-based) epoch of phase 2 (decoder gradient released); ``>= epochs``
            keeps phase 1 throughout.
        kl_warmup_epochs: λ1 rises linearly from 0 to its phase value over this many epochs (0 = off).
        lambdas_phase1 / lambdas_phase2: (λ1 KL, λ2 recon, λ3 Lm(ẑ), λ4 Lm(z_I)). Phase 1 is the paper's;
            phase 2 defaults to :data:`PHASE2_LAMBDAS` (the paper's, chosen by the written protocol).
        recon_share: k, the reconstruction's share in phase 2: multiplies the phase-2 λ1 and λ2 together, so
            the variance branch's β = λ1/λ2 stays and only how strongly the decoder's gradient trains z_I
            against the metric loss moves. Default 1 (the paper's, chosen by the written protocol with
            :data:`PHASE2_LAMBDAS`), also what a recorded config without the field (runs before it existed) reads
            back as.
            Measured on validation classes (docs/history.md): k alone (λ3 = 0.2) lifts N-pair on wordnet_dev
            at k = 16 and costs the demo world; at the default schedule it turns the gradient below cos 0.95
            on the demo world only at k ≳ 64, at −9 points of validation Recall@1.
        reduction: ``None`` = :func:`default_reduction`: ``sum`` for triplet and triplet-dws, ``mean`` for the
            other losses. ``sum`` (the paper's eqs. 2, 4, 8, 9) = KL summed over E, the reconstruction term
            summed over D, the triplet losses summed over their triplets (N-pair keeps eq. 3's mean over pairs);
            ``mean`` = KL averaged over E, recon over D, the triplet losses averaged over their non-zero
            triplets (dvml's earlier default). With the paper's L2 reconstruction the sums made recon O(100)
            against O(0.1-1) metric terms (a synth world's test Recall@1 fell from 0.64 to 0.09 once phase 2
            opened); with the calibrated ``likelihood="gaussian"`` the reconstruction no longer scales with
            the features' units, and the sums weigh the four terms as the paper's λs assume.
        metric_reduction: how the triplet losses reduce over their triplets: ``sum``, ``mean`` (over all
            triplets) or ``nonzero`` (over the non-zero ones, pml's reducer); ``None`` = ``sum`` with
            ``reduction="sum"``, ``nonzero`` with ``"mean"``.
        likelihood: the reconstruction term: ``gaussian`` (default; the NLL of x under N(x̂, s²I) with s² the
            batch's mean squared error, the "optimal σ" calibrated decoder of Rybkin et al. 2021: independent of
            the features' units) or ``l2`` (the paper's ‖x − x̂‖²; its balance against the KL depends on the
            backbone's units: on unit-norm text features it collapses the posterior).
        standardize: reconstruct per-dimension standardised features (training statistics) instead of x. Needs
            fixed features: fit-heads only (finetune refuses it; its features change as the backbone trains).
        free_bits: KL free bits per dimension (Kingma et al. 2016); 0 = off.
        variance_space: where z_V is added. ``None`` = :func:`default_variance_space`: where the metric loss
            compares embeddings — ``normalized`` (ẑ = z_I/‖z_I‖ + s·z_V, on the unit sphere) for the losses that
            L2-normalise, ``raw`` (the paper's ẑ = z_I + s·z_V) for N-pair's dot products (on the sphere, ẑ would
            have about 1/‖z_I‖ of z_I's logits: measured on the demo world, Lm(ẑ)'s gradient 0.15 against
            Lm(z_I)'s 4.75, i.e. the synthetic term did nothing).
        variance_scale: ``class`` (default): s = the batch's pooled within-class standard deviation per
            dimension of the embedding z_V is added to (so a prior draw moves an embedding about as far as its
            class's members lie from their centre); ``unit`` (the paper): s = 1.
        variance_kappa: multiplier of s.
        metric_grad_to_variance: whether Lm(ẑ)'s gradient reaches μ and σ. False (default): they learn from the
            KL and reconstruction only — the variance branch is a generative model of the features, and the metric
            loss uses its samples as data. True (the paper, eq. 12 read literally): Lm(ẑ) also trains the
            generator of its own inputs, towards *easy* samples and an input-independent μ — measured (seed
            0): on wordnet_dev 10 of 512 units active (KL 31 nats from a uniformly narrowed σ, no
            information about x) against 512 of 512 without; on the demo world Lm(ẑ) − Lm(z_I) 95 against 1,400
            (κ 1.5).
        centre_mu: centre the posterior mean within each class of the batch (z_V's mean carries no class
            information).
        variance_source: ``learned`` (DVML) or ``noise``, the control arm: everything trains as DVML does, but
            z_V is isotropic N(0, I) noise instead of a draw from the learned posterior (no μ, log σ² layers), at
            the same per-batch scale s (:meth:`~dvml.heads.model.DVMLHeads.zv_scale`). What remains: Lm(ẑ) on
            ẑ = base + s·ε with the same λ3; the decoder and the reconstruction term with the same λ2 (in phase 2
            they still train z_I to carry what reconstructs x, as in DVML: the arm differs only in the draws); the
            KL term is 0 (the noise *is* the prior) and has no gradient. A gain of DVML over this arm is what the
            learned intra-class distribution adds over noise of the same size.
        synthetic_pairs: what Lm(ẑ) pairs: ``within`` (the paper's eq. 10: each synthetic batch alone) or
            ``cross`` (the pairs and triplets of Lm(z_I), anchors real, positives and negatives synthetic; the
            paper's "hard samples generated from easy negatives" seen from a real anchor). ``None`` =
            ``within``. ``cross`` is for triplet, triplet-dws and npair. Measured (on
            validation classes of both sets): cross leaves validation Recall@1 where it was and brings the sum of
            Lm(z_I)'s and Lm(ẑ)'s gradients *closer* to Lm(z_I)'s (the draws' noise on one side of each
            distance, not both).
        lr: Adam learning rate of the heads (the paper: 1e-4).
        proxy_lr: learning rate of a proxy loss's proxies (Adam, no decay); ``None`` =
            :data:`DEFAULT_PROXY_LR` (0.1) whatever ``lr`` is: proxies start random and must move far faster than
            the heads. Runs recorded before the change hold the value they used (100 × lr).
        weight_decay: Adam weight decay (L2) on the heads (not on proxies).
        batch_size: images per batch; ``None`` = 120 for triplet, 128 otherwise (the paper), made smaller when
            the data has fewer classes than that needs (:mod:`dvml.heads.batch`).
        per_class: images per class in a batch; ``None`` = 2 for npair, 4 otherwise.
        margin, gamma, temperature, label_smoothing: parameters of the metric loss, each only for the losses
            that have it (:data:`LOSS_PARAM_DEFAULTS`; giving one to another loss is an error); ``None`` = that
            loss's default. Resolved in ``__post_init__``: the recorded config holds the value used (``None``
            where the loss has no such parameter).
        seed: seeds initialisation, batches, views and the z_V noise.
    """

    loss: LossName = field(default=LossName.triplet, metadata=option(
        "Metric loss Lm (any registered loss: dvml.losses.registry)."))
    dvml: bool = field(default=True, metadata=option(
        "--no-dvml: the baseline, the same embedding layer trained with Lm(z_I) alone."))
    embedding_size: int = field(default=512, metadata=option("Embedding size E (z_I, mu, log sigma^2)."))
    decoder_hidden: int = field(default=512, metadata=option("Decoder hidden width.", panel=SCHEDULE_PANEL))
    samples: int = field(default=20, metadata=option("T: z_V draws per image and step.", flags=("--samples", "-T")))
    epochs: int = field(default=60, metadata=option("Training epochs."))
    phase2_epoch: int = field(default=30, metadata=option(
        "First (0-based) epoch of phase 2 (decoder gradient reaches z_I); >= --epochs keeps phase 1.",
        panel=SCHEDULE_PANEL))
    kl_warmup_epochs: int = field(default=30, metadata=option(
        "KL weight rises linearly from 0 over this many epochs (0 = off).", panel=SCHEDULE_PANEL))
    lambdas_phase1: tuple[float, float, float, float] = field(default=PHASE1_LAMBDAS, metadata=option(
        "Phase-1 " + _LAMBDAS_HELP, panel=SCHEDULE_PANEL))
    lambdas_phase2: tuple[float, float, float, float] = field(default=PHASE2_LAMBDAS, metadata=option(
        "Phase-2 " + _LAMBDAS_HELP, panel=SCHEDULE_PANEL))
    recon_share: float = field(default=DEFAULT_RECON_SHARE, metadata=option(
        "k: multiplies the phase-2 KL and reconstruction weights together: how strongly the decoder's gradient "
        "trains z_I against the metric loss (default 1, the paper's, with the phase-2 weights 0.8,1,0.2,0.8: chosen "
        "by the written protocol on validation classes, docs/protocol.md). dvml tune searches it.",
        panel=OBJECTIVE_PANEL))
    reduction: Reduction | None = field(default=None, metadata=option(
        "sum (the paper's eqs. 2, 4, 8, 9: KL over E, recon over D, triplet losses over their triplets) or mean "
        "(per dimension / non-zero triplet) (default: sum for triplet and triplet-dws, mean for the other losses).",
        panel=OBJECTIVE_PANEL))
    metric_reduction: MetricReduction | None = field(default=None, metadata=option(
        "Triplet losses over their triplets (default: sum with --reduction sum, else nonzero).",
        panel=OBJECTIVE_PANEL))
    likelihood: Likelihood = field(default=Likelihood.gaussian, metadata=option(
        "Reconstruction term: l2 (the paper) or gaussian (calibrated decoder: NLL at the maximum-likelihood shared "
        "variance, independent of the features' units).", panel=OBJECTIVE_PANEL))
    standardize: bool = field(default=False, metadata=option(
        "Reconstruct per-dimension standardised features (training statistics). fit-heads only: finetune refuses "
        "it (its features change as the backbone trains).", panel=OBJECTIVE_PANEL))
    free_bits: float = field(default=0.0, metadata=option(
        "KL free bits: nats per dimension not charged (0 = off).", panel=OBJECTIVE_PANEL))
    variance_space: VarianceSpace | None = field(default=None, metadata=option(
        "raw: z_hat = z_I + s*z_V (the paper); normalized: z_hat = z_I/||z_I|| + s*z_V (default: where the metric "
        "loss compares: normalized, raw for npair's dot products).", panel=OBJECTIVE_PANEL))
    variance_scale: VarianceScale = field(default=VarianceScale.class_, metadata=option(
        "s: unit (1, the paper) or class (the batch's within-class std per dimension of the embedding z_V is added "
        "to).", panel=OBJECTIVE_PANEL))
    variance_kappa: float = field(default=1.0, metadata=option("Multiplier of s.", panel=OBJECTIVE_PANEL))
    metric_grad_to_variance: bool = field(default=False, metadata=option(
        "Whether Lm(z_hat) trains mu and sigma too (the paper) or only z_I (mu, sigma then learn from the KL and "
        "reconstruction; the default: through mu and sigma, Lm(z_hat) made its own samples easy and mu "
        "input-independent).", panel=OBJECTIVE_PANEL))
    centre_mu: bool = field(default=False, metadata=option(
        "Centre the posterior mean within each class of the batch.", panel=OBJECTIVE_PANEL))
    variance_source: VarianceSource = field(default=VarianceSource.learned, metadata=option(
        "learned: z_V drawn from the learned posterior (DVML); noise: the control arm, trained exactly as DVML but "
        "z_V is isotropic N(0, I) noise at the same per-batch scale (no encoder, KL 0; decoder and reconstruction "
        "kept).", panel=OBJECTIVE_PANEL))
    synthetic_pairs: SyntheticPairs | None = field(default=None, metadata=option(
        "What Lm(z_hat) pairs: within (the paper's eq. 10: each synthetic batch alone) or cross (Lm(z_I)'s pairs "
        "and triplets, anchors real z_I, positives and negatives synthetic; triplet, triplet-dws, npair) (default: "
        "within).", panel=OBJECTIVE_PANEL))
    lr: float = field(default=1e-4, metadata=option("Adam learning rate of the heads."))
    proxy_lr: float | None = field(default=None, metadata=option(
        f"Learning rate of a proxy loss's proxies (default: {DEFAULT_PROXY_LR:g}, whatever --lr is; only proxy "
        "losses use it).", panel=SCHEDULE_PANEL))
    weight_decay: float = field(default=0.0, metadata=option(
        "Adam weight decay (heads; finetune: and backbone).", panel=SCHEDULE_PANEL))
    batch_size: int | None = field(default=None, metadata=option(
        "Images per batch (finetune: over all processes; default depends on the loss: 120 for triplet, 128 "
        "otherwise; fitted to the data when it has fewer classes than that needs)."))
    per_class: int | None = field(default=None, metadata=option(
        "Images per class in a batch (default depends on the loss: 2 for npair, 4 otherwise).",
        panel=SCHEDULE_PANEL))
    margin: float | None = field(default=None, metadata=option(loss_param_help("margin"), panel=LOSS_PANEL))
    gamma: float | None = field(default=None, metadata=option(loss_param_help("gamma"), panel=LOSS_PANEL))
    temperature: float | None = field(default=None, metadata=option(loss_param_help("temperature"),
                                                                    panel=LOSS_PANEL))
    label_smoothing: float | None = field(default=None, metadata=option(loss_param_help("label_smoothing"),
                                                                        panel=LOSS_PANEL))
    seed: int = field(default=0, metadata=option("Seed (initialisation, batches, views / augmentation, z_V noise)."))
    #: Derived: whether ``batch_size`` was chosen (not ``None``) or is the loss's default, which a fit may fit to
    #: the data (:mod:`dvml.heads.batch`). Not recorded: a recorded config's batch was the one used.
    batch_size_given: bool = field(default=True, init=False, repr=False, compare=False, metadata=DERIVED)

    def __post_init__(self):
        s = object.__setattr__
        s(self, "loss", resolve_loss(self.loss))
        spec = loss_spec(self.loss)
        if self.dvml and not spec.dvml:
            raise FieldError(f"`loss` {self.loss.value} cannot be DVML's metric loss; fit the baseline (`dvml` off)")
        if self.reduction is None:
            s(self, "reduction", default_reduction(self.loss))
        set_choice(self, "reduction", Reduction)
        if self.variance_space is None:
            s(self, "variance_space", default_variance_space(self.loss))
        if self.metric_reduction is None:
            s(self, "metric_reduction", MetricReduction.sum if self.reduction is Reduction.sum
              else MetricReduction.nonzero)
        if self.synthetic_pairs is None:
            s(self, "synthetic_pairs", SyntheticPairs.within)  # the paper's eq. 10, for every loss
        for name, choices in (("metric_reduction", MetricReduction), ("likelihood", Likelihood),
                              ("variance_space", VarianceSpace), ("variance_scale", VarianceScale),
                              ("synthetic_pairs", SyntheticPairs),
                              ("variance_source", VarianceSource)):
            set_choice(self, name, choices)
        if self.synthetic_pairs is SyntheticPairs.cross and not spec.cross_pairs:
            raise FieldError(f"`synthetic_pairs` cross needs anchors to pair: it is for {CROSS_PAIR_NAMES}, not "
                             f"`loss` {self.loss.value}")
        for name in FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None and not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v}")
        s(self, "recon_share", float(self.recon_share))
        if not self.recon_share > 0:
            raise ValueError(f"recon_share must be > 0 (it multiplies the phase-2 KL and reconstruction weights), "
                             f"got {self.recon_share}")
        if not self.variance_kappa > 0:
            raise ValueError(f"variance_kappa must be > 0, got {self.variance_kappa}")
        if self.free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {self.free_bits}")
        for name in ("embedding_size", "decoder_hidden", "samples", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("phase2_epoch", "kl_warmup_epochs"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lambdas_phase1", "lambdas_phase2"):
            lam = tuple(float(v) for v in getattr(self, name))
            if len(lam) != 4 or not all(0 <= v < math.inf for v in lam):
                raise ValueError(f"{name} must be four finite non-negative weights (KL, recon, Lm(z_hat), Lm(z_I)), "
                                 f"got {getattr(self, name)}")
            s(self, name, lam)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        s(self, "proxy_lr", float(self.proxy_lr) if self.proxy_lr is not None else DEFAULT_PROXY_LR)
        if not self.proxy_lr > 0:
            raise ValueError(f"proxy_lr must be > 0, got {self.proxy_lr}")
        s(self, "batch_size_given", self.batch_size is not None)  # else fitted to the data (heads.batch)
        s(self, "batch_size", int(self.batch_size) if self.batch_size is not None
          else default_batch_size(self.loss))
        s(self, "per_class", int(self.per_class) if self.per_class is not None else default_per_class(self.loss))
        if self.per_class < 2:
            raise ValueError(f"per_class must be >= 2 (a batch needs positives), got {self.per_class}")
        if spec.per_class_fixed and self.per_class != spec.per_class:
            raise ValueError(f"the {self.loss.value} loss takes exactly {spec.per_class} images per class (its "
                             f"pairs), got per_class={self.per_class}")
        triplets = getattr(self, "triplet_input", False)  # a FitConfig field: batches of triplets, not of classes
        if not triplets and (self.batch_size < 2 * self.per_class or self.batch_size % self.per_class):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of per_class ({self.per_class}) "
                             "covering at least 2 classes")
        self._resolve_loss_params()

    def _resolve_loss_params(self) -> None:
        takes = loss_spec(self.loss).params
        for name in LOSS_PARAM_NAMES:
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, takes.get(name))
                continue
            if name not in takes:
                has = ", ".join(f"`{k}`" for k in takes) or "none"
                raise FieldError(f"`{name}` does not apply to `loss` {self.loss.value} "
                                 f"(its parameters: {has})")
            value = float(value)
            if name == "temperature" and not value > 0:
                raise ValueError(f"temperature must be > 0, got {value}")
            if name == "label_smoothing" and not 0.0 <= value < 1.0:
                raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
            if name in ("margin", "gamma") and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)

    def heads_kwargs(self) -> dict:
        """Keyword arguments of :class:`~dvml.heads.model.DVMLHeads` after ``in_dim``: sizes and the variance
        branch's options (:data:`HEADS_KWARGS` and ``variance_source``, which recorded configs without it read
        back as ``learned``)."""
        return {**{name: getattr(self, name) for name in HEADS_KWARGS}, "variance_source": self.variance_source}

    def loss_params(self) -> dict[str, float]:
        """The metric loss's parameters (resolved): keyword arguments of ``make_metric_loss``."""
        return {k: getattr(self, k) for k in loss_spec(self.loss).params}

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def classes_per_batch(self) -> int:
        return self.batch_size // self.per_class

    def lambdas(self, epoch: float) -> Lambdas:
        """The weights at (fractional, 0-based) training time ``epoch`` = epoch index + fraction done.

        Phase 2 from ``phase2_epoch`` on, its λ1 and λ2 multiplied by ``recon_share``; λ1 multiplied by
        ``min(1, epoch / kl_warmup_epochs)``.
        """
        phase = 2 if epoch >= self.phase2_epoch else 1
        kl, recon, syn, inv = self.lambdas_phase2 if phase == 2 else self.lambdas_phase1
        share = self.recon_share if phase == 2 else 1.0
        warm = 1.0 if self.kl_warmup_epochs == 0 else min(1.0, max(0.0, epoch) / self.kl_warmup_epochs)
        return Lambdas(share * kl * warm, share * recon, syn, inv, stop_recon_grad=phase == 1, phase=phase)

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-python dict (paths and enums as strings) of every field but the private ones."""
        return plain_dict(self)


@dataclass(frozen=True, kw_only=True)
class FitConfig(HeadsConfig):
    """Everything a heads fit depends on: :class:`HeadsConfig` and where/how it runs on cached features.

    Attributes:
        cache: HDF5 feature cache (train split for fitting, test split for the watch-only Recall@1).
        out: run directory (created).
        device: auto (cuda, then mps, then cpu) | cpu | cuda | mps.
        eval_every: every this many epochs (and at the last), log test Recall@1 (watch only) and, with
            ``val_classes``, validation Recall@1; 0 = never.
        val_classes: hold this many classes out of the *training* classes as a validation split
            (:func:`~dvml.seeding.hold_out_classes`); the reported model is then the epoch with the best
            validation Recall@1 (otherwise the last epoch). Never selects on test classes.
        preset: the name of the :mod:`~dvml.heads.presets` preset the CLI filled the defaults from (``dvml`` or
            ``paper``); recorded in config.json (a label: the fields hold what was used).
        resume: continue an interrupted run in ``out``.
        overwrite: replace a run already in ``out``.
        triplet_input: triplet loss only: batches of batch_size/3 explicit (anchor, positive, negative)
            triplets, the paper's "triplet input" (section 3.5: 120 images = 40 triplets), instead of every
            triplet of a class-balanced batch.
        diag_images: images (view 0, a fixed seeded subset of the training split) the per-epoch diagnostics
            are computed on (:mod:`dvml.heads.diagnostics`); 0 = off.
        grad_every: the per-term gradients on the embedding layer are sampled at the first step of every
            epoch and every this many global steps; 0 = off.
    """

    cache: Path  # the command's CACHE argument
    out: Path = field(metadata=option("Run directory to write (heads.pt, config.json, log.jsonl).",
                                      flags=("--out", "-o")))
    preset: Preset = field(default=Preset.dvml, metadata=option(
        "Defaults for the options not given: dvml (fit-heads' defaults, phase-2 weights chosen by the written "
        "protocol, docs/protocol.md) or paper (every setting as the paper has it: phase-2 weights 0.8,1,0.2,0.8, "
        "recon share 1, l2 reconstruction, raw z_I, unit scale, Lm(z_hat) trains mu and sigma). Recorded in "
        "config.json."))
    triplet_input: bool = field(default=False, metadata=option(
        "triplet loss: batches of 40 explicit triplets (the paper's triplet input) instead of every triplet of a "
        "class-balanced batch.", panel=SCHEDULE_PANEL))
    device: DeviceChoice = field(default=DeviceChoice.auto, metadata=option(
        "auto = CUDA, then MPS (Apple silicon), then CPU."))
    eval_every: int = field(default=5, metadata=option(
        "Log test Recall@1 (watch only) every N epochs and at the end; 0 = never."))
    val_classes: int = field(default=0, metadata=option(
        "Hold out K training classes; report the epoch best on them (default: the last epoch)."))
    diag_images: int = field(default=2048, metadata=option(
        "Training images (view 0, seeded subset) of the per-epoch diagnostics; 0 = off.", panel=DIAGNOSTICS_PANEL))
    grad_every: int = field(default=100, metadata=option(
        "Sample the per-term gradients on the embedding layer every N steps (and at each epoch's first step); "
        "0 = off.", panel=DIAGNOSTICS_PANEL))
    resume: bool = field(default=False, metadata=RESUME_OPTION)
    overwrite: bool = field(default=False, metadata=OVERWRITE_OPTION)

    def __post_init__(self):
        s = object.__setattr__
        s(self, "cache", Path(self.cache))
        s(self, "out", Path(self.out))
        super().__post_init__()
        set_choice(self, "device", DeviceChoice)
        set_choice(self, "preset", Preset)
        for name in ("eval_every", "val_classes"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.val_classes and not self.eval_every:
            raise ValueError("val_classes needs eval_every >= 1 (validation picks the best evaluated epoch)")
        if self.diag_images < 0 or self.grad_every < 0:
            raise ValueError("diag_images and grad_every must be >= 0")
        if self.triplet_input:
            if "fixed_triplets" not in loss_spec(self.loss).settings:
                raise FieldError(f"`triplet_input` applies to `loss` triplet only, got {self.loss.value}")
            if self.batch_size % 3:
                raise FieldError(f"`triplet_input` needs a batch size divisible by 3, got {self.batch_size}")

    def model_dict(self) -> dict:
        """:meth:`to_dict` without the execution-control fields (what must match on --resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTROL_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> FitConfig:
        """A recorded config (``config.json``, a checkpoint's) back as a FitConfig. Every field is recorded, but
        ``recon_share`` only since it exists: a config without it trained with k = 1 and, if it lacks them too,
        the paper's phase-2 λs (dvml's defaults until 2026-12-03), not today's defaults."""
        names = {f.name for f in config_fields(cls)}
        d = {**LEGACY_PHASE2_FIELDS, **d}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})
