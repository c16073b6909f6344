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

from typing import NamedTuple

import torch
from torch import nn


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
    """

    def __init__(self, in_dim: int, embedding_size: int = 512, decoder_hidden: int = 512, dvml: bool = True):
        super().__init__()
        self.in_dim, self.embedding_size, self.dvml = in_dim, embedding_size, dvml
        self.embedding = nn.Linear(in_dim, embedding_size)
        if dvml:
            self.mu = nn.Linear(in_dim, embedding_size)
            self.logvar = nn.Linear(in_dim, embedding_size)
            self.decoder = Decoder(embedding_size, decoder_hidden, in_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time output: z_I only. x (B, D) → (B, E)."""
        return self.embedding(x)

    def forward(self, x: torch.Tensor, *, samples: int = 20, stop_recon_grad: bool = False,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> HeadsOutput:
        """Training forward pass.

        Args:
            x: (B, D) features.
            samples: T, draws of z_V per image.
            stop_recon_grad: phase 1: the decoder's input carries no gradient to the embedding layer (nor to
                x); see the module docstring.
            generator: source of ε (on x's device); ignored when ``eps`` is given.
            eps: (T, B, E) standard-normal noise to use instead of drawing (tests).
        Returns:
            :class:`HeadsOutput`; all T draws go through the decoder as one (T·B, E) batch.
        """
        z_i = self.embedding(x)
        if not self.dvml:
            return HeadsOutput(z_i, None, None, None, None)
        mu, logvar = self.mu(x), self.logvar(x)
        if eps is None:
            eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z_v = mu + (0.5 * logvar).exp() * eps  # (T, B, E): reparameterised, gradient reaches μ and σ
        z_syn = z_i + z_v
        if stop_recon_grad:
            if x.requires_grad:  # a trainable backbone below: recompute the variance branch on a detached x
                xd = x.detach()
                z_v = self.mu(xd) + (0.5 * self.logvar(xd)).exp() * eps
            dec_in = z_i.detach() + z_v
        else:
            dec_in = z_syn
        x_hat = self.decoder(dec_in)
        return HeadsOutput(z_i, mu, logvar, z_syn, x_hat)
