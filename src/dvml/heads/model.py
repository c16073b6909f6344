"""The DVML heads: three parallel linear layers on a backbone feature, reparameterised z_V draws, decoder.

::

    x (B, D) ──embedding──▶ z_I (B, E)          the output used at test time (class centre)
             ──mu─────────▶ μ   (B, E)
             ──logvar─────▶ log σ² (B, E)
    z_V[t] = μ + σ ⊙ ε[t],  ε ~ N(0, I),  t = 1..T              (T, B, E), reparameterised
    ẑ[t]   = z_I + z_V[t]                                        (T, B, E) synthetic embeddings
    x̂[t]   = decoder(ẑ[t]) = W2 · tanh(W1 · ẑ[t] + b1) + b2     (T, B, D)

**tanh placement.** The paper's decoder is two linear layers (E → 512 → D) "where tanh is used as the
activation function". Its target x is a pooled ReLU feature: non-negative and often above 1, which a tanh
*output* could never reach. So the tanh is the hidden layer's activation and the output layer is linear:
targets stay in their own units (no rescaling to undo, no clipping), and the reconstruction error is in the
feature space the metric is learnt from.

**Phase-1 gradient stop.** "The embedding layers" are the layers that produce z_I — the ``embedding`` linear
layer here, plus, when the heads sit on a trainable backbone (end-to-end finetuning), the backbone that
produces x. In phase 1 the reconstruction gradient must reach neither. It *must* reach the decoder and the
variance layers μ, log σ²: those form the variational model of intra-class variance, and without the
reconstruction term they would learn only from the KL term (collapsing to the prior) and Lm(ẑ). So in phase 1
the decoder is fed ``z_I.detach() + z_V'`` where z_V' uses the same ε but μ, log σ² computed from
``x.detach()`` (identical values; when x is a constant cached feature, z_V' *is* z_V and nothing is
recomputed). The metric term Lm(ẑ) always sees the undetached ẑ = z_I + z_V, so its gradient reaches every
layer in both phases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dvml.heads.config import HeadsConfig, VarianceScale, VarianceSource, VarianceSpace

#: The paper's variance branch (z_V added to raw z_I at unit scale, Lm(ẑ)'s gradient on μ and σ): keyword arguments
#: of :class:`DVMLHeads` over its defaults (dvml's).
PAPER_HEADS = {"variance_space": "raw", "variance_scale": "unit", "metric_grad_to_variance": True}
#: The heads' defaults are the config's: ``DVMLHeads(in_dim)`` is the model ``fit(FitConfig(...))`` builds.
_DEFAULT = HeadsConfig()

#: Concatenates a tensor's rows over the processes of a distributed run, keeping the gradient (finetune under
#: torchrun: :func:`dvml.finetune.distributed.gather_batch`); the batch statistics are then the global batch's.
Gather = Callable[[torch.Tensor], torch.Tensor]


class HeadsOutput(NamedTuple):
    """Output of :meth:`DVMLHeads.forward`.

    z_i: (B, E) intra-class invariance (the embedding).
    mu, logvar: (B, E) parameters of q(z_V | x); ``None`` for the baseline (``dvml=False``).
    z_syn: (T, B, E) synthetic embeddings ẑ = z_I + z_V (reparameterised); ``None`` for the baseline.
    x_hat: (T, B, D) decoder reconstructions; ``None`` for the baseline.
    """

    z_i: torch.Tensor
    mu: torch.Tensor | None
    logvar: torch.Tensor | None
    z_syn: torch.Tensor | None
    x_hat: torch.Tensor | None


def class_means(v: torch.Tensor, labels: torch.Tensor,
                gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class means of the rows of v (B, E) → (classes (C,) sorted, means (C, E), the index of each row's class
    (B,)); with ``gather``, the classes and means of every process's rows."""
    all_v, all_labels = (v, labels) if gather is None else (gather(v), gather(labels))
    classes, inv = torch.unique(all_labels, return_inverse=True)
    sums = torch.zeros((len(classes), v.shape[1]), dtype=v.dtype, device=v.device).index_add(0, inv, all_v)
    counts = torch.bincount(inv, minlength=len(classes)).to(v.dtype)
    mine = inv if gather is None else torch.searchsorted(classes, labels)
    return classes, sums / counts[:, None], mine


def class_centred(v: torch.Tensor, labels: torch.Tensor | None, gather: Gather | None = None) -> torch.Tensor:
    """(B, E) rows minus the mean row of their class in the batch (a class seen once becomes 0); with
    ``gather``, the class means of the global batch (every process's rows)."""
    if labels is None:
        raise ValueError("centre_mu needs the batch's labels")
    _, means, mine = class_means(v, labels, gather)
    return v - means[mine]


class Decoder(nn.Module):
    """ẑ (..., E) → x̂ (..., D): Linear(E, hidden) → tanh → Linear(hidden, D) (linear output; see module doc)."""

    def __init__(self, embedding_size: int, hidden: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(embedding_size, hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(z)))


class DVMLHeads(nn.Module):
    """DVML heads on D-dimensional features.

    Args:
        in_dim: D, the backbone feature size (from the cache's ``feature_dim``).
        embedding_size: E (the paper: 512).
        decoder_hidden: decoder hidden width (the paper: 512).
        dvml: False builds only the embedding layer (the ``--no-dvml`` baseline). The embedding layer is
            created first, so the same seed gives the baseline and DVML the same initial embedding layer.
        variance_space, variance_scale, variance_kappa, metric_grad_to_variance, centre_mu: the variance
            branch's options (:class:`~dvml.heads.config.HeadsConfig`; members or their strings).

    Every default is :class:`~dvml.heads.config.HeadsConfig`'s (for its default loss, triplet: z_V on the unit
    sphere at the class's scale, no Lm(ẑ) gradient on μ and σ), so ``DVMLHeads(in_dim)`` is the model a default
    fit builds; :meth:`from_config` builds any config's. The paper's heads: ``variance_space="raw",
    variance_scale="unit", metric_grad_to_variance=True``.

    variance_source: ``learned`` (DVML) or ``noise`` (the control arm: no μ, log σ² layers; z_V = ε ~ N(0, I) at
    the same scale s, and the output's ``mu``/``logvar`` are zeros, so the KL term is 0).
    """

    def __init__(self, in_dim: int, embedding_size: int = _DEFAULT.embedding_size,
                 decoder_hidden: int = _DEFAULT.decoder_hidden, dvml: bool = _DEFAULT.dvml,
                 variance_space: VarianceSpace | str = _DEFAULT.variance_space,
                 variance_scale: VarianceScale | str = _DEFAULT.variance_scale,
                 variance_kappa: float = _DEFAULT.variance_kappa,
                 metric_grad_to_variance: bool = _DEFAULT.metric_grad_to_variance,
                 centre_mu: bool = _DEFAULT.centre_mu,
                 variance_source: VarianceSource | str = _DEFAULT.variance_source):
        super().__init__()
        variance_space, variance_scale = VarianceSpace(variance_space), VarianceScale(variance_scale)
        if not variance_kappa > 0:
            raise ValueError(f"variance_kappa must be > 0, got {variance_kappa}")
        self.in_dim, self.embedding_size, self.dvml = in_dim, embedding_size, dvml
        self.variance_space, self.variance_scale, self.variance_kappa = variance_space, variance_scale, variance_kappa
        self.metric_grad_to_variance = metric_grad_to_variance
        self.centre_mu = centre_mu
        self.variance_source = VarianceSource(variance_source)
        self.embedding = nn.Linear(in_dim, embedding_size)
        if dvml:
            if self.variance_source is VarianceSource.learned:
                self.mu = nn.Linear(in_dim, embedding_size)
                self.logvar = nn.Linear(in_dim, embedding_size)
            self.decoder = Decoder(embedding_size, decoder_hidden, in_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time output: z_I only. x (B, D) → (B, E)."""
        return self.embedding(x)

    def variance_base(self, z_i: torch.Tensor) -> torch.Tensor:
        """What z_V is added to: z_I (``variance_space="raw"``) or z_I/‖z_I‖ (``"normalized"``); (..., E)."""
        return z_i if self.variance_space is VarianceSpace.raw else F.normalize(z_i, dim=-1)

    def zv_scale(self, base: torch.Tensor, labels: torch.Tensor | None,
                 gather: Gather | None = None) -> torch.Tensor | float:
        """The factor s in ẑ = base + s·z_V (detached): κ for ``variance_scale="unit"``; for ``"class"``,
        κ · the batch's pooled within-class standard deviation per dimension of ``base`` (B, E), i.e.
        ``sqrt(Σ_i ‖base_i − c_{y_i}‖² / ((B − C)·E))`` with c the batch's class means — so a draw from the prior
        moves an embedding about as far as its class's members lie from their centre. With ``gather``, B, C
        and the sum are the global batch's (every process's rows)."""
        if self.variance_scale is VarianceScale.unit:
            return self.variance_kappa
        if labels is None:
            raise ValueError("variance_scale='class' needs the batch's labels")
        b, y = (base.detach(), labels) if gather is None else (gather(base.detach()), gather(labels))
        _, means, inv = class_means(b, y)
        dev = b - means[inv]
        dof = max(1, b.shape[0] - means.shape[0])
        return self.variance_kappa * (dev.square().sum() / (dof * b.shape[1])).sqrt()

    def synthesize(self, x: torch.Tensor, *, samples: int = 20, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> HeadsOutput:
        """The forward pass without the decoder (``x_hat`` is None); arguments as :meth:`forward`."""
        return self.forward(x, samples=samples, generator=generator, eps=eps, labels=labels, decode=False)

    @classmethod
    def from_config(cls, in_dim: int, cfg: HeadsConfig | None = None) -> DVMLHeads:
        """The heads of ``cfg`` (default: ``HeadsConfig()``) on ``in_dim``-dimensional features, as a fit builds
        them (:meth:`~dvml.heads.config.HeadsConfig.heads_kwargs`)."""
        return cls(in_dim, **(cfg if cfg is not None else _DEFAULT).heads_kwargs())

    def forward(self, x: torch.Tensor, *, samples: int = 20, stop_recon_grad: bool = False,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decode: bool = True,
                gather: Gather | None = None) -> HeadsOutput:
        """Training forward pass.

        Args:
            x: (B, D) features.
            samples: T, draws of z_V per image.
            stop_recon_grad: phase 1: the decoder's input carries no gradient to the embedding layer (nor to
                x); see the module docstring.
            generator: source of ε (on x's device); ignored when ``eps`` is given.
            eps: (T, B, E) standard-normal noise to use instead of drawing (tests).
            labels: (B,) class ids; needed by ``variance_scale="class"`` and ``centre_mu`` only.
            (With ``centre_mu`` the posterior mean is centred within each class of the batch, μ − mean_class(μ):
            z_V then carries no class information in its mean, only how an image deviates from its class.)
            (With ``metric_grad_to_variance=False`` the returned ``z_syn`` carries z_V detached: the metric term
            Lm(ẑ) then trains the embedding, while μ and σ learn from the KL and reconstruction terms alone.)
            decode: False skips the decoder (``x_hat`` None).
            gather: when this process holds a shard of a distributed batch (finetune under torchrun): how the
                batch statistics (``variance_scale="class"``, ``centre_mu``) see every process's rows, so that
                they are the global batch's, as in one process (:data:`Gather`). None = ``x`` is the batch.
        Returns:
            :class:`HeadsOutput`; all T draws go through the decoder as one (T·B, E) batch. With
            ``variance_space="raw"`` (the paper) ẑ = z_I + s·z_V; with ``"normalized"`` ẑ = z_I/‖z_I‖ + s·z_V
            (the variance is modelled where the metric loss looks: on the unit sphere); s from :meth:`zv_scale`.
        """
        z_i = self.embedding(x)
        if not self.dvml:
            return HeadsOutput(z_i, None, None, None, None)
        noise = self.variance_source is VarianceSource.noise
        if noise:  # the control arm: z_V ~ N(0, I), the prior itself (no encoder, no gradient, KL 0)
            mu = logvar = z_i.new_zeros(z_i.shape).detach()
        else:
            mu, logvar = self.mu(x), self.logvar(x)
        if self.centre_mu and not noise:
            mu = class_centred(mu, labels, gather)
        if eps is None:
            eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z_v = mu + (0.5 * logvar).exp() * eps  # (T, B, E): reparameterised, gradient reaches μ and σ
        base = self.variance_base(z_i)
        scale = self.zv_scale(base, labels, gather)
        z_syn = base + scale * z_v
        if not self.metric_grad_to_variance:  # Lm(ẑ) trains z_I only; μ, σ learn from the ELBO alone
            z_syn_metric = base + scale * z_v.detach()
        else:
            z_syn_metric = z_syn
        if not decode:
            return HeadsOutput(z_i, mu, logvar, z_syn_metric, None)
        if stop_recon_grad:
            if x.requires_grad and not noise:  # a trainable backbone below: the variance branch on a detached x
                xd = x.detach()
                mu_d = class_centred(self.mu(xd), labels, gather) if self.centre_mu else self.mu(xd)
                z_v = mu_d + (0.5 * self.logvar(xd)).exp() * eps
            dec_in = base.detach() + scale * z_v
        else:
            dec_in = z_syn
        x_hat = self.decoder(dec_in)
        return HeadsOutput(z_i, mu, logvar, z_syn_metric, x_hat)
