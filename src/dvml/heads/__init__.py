"""Stage two: the DVML heads, decoder and four-term loss, trained in memory on cached features.

* :mod:`dvml.heads.config`         :class:`FitConfig` (frozen, validated) and the phase/λ schedule
* :mod:`dvml.heads.model`          :class:`DVMLHeads` (z_I, μ, log σ², reparameterised z_V, decoder)
* :mod:`dvml.heads.terms`          KL and reconstruction terms (pure functions)
* :mod:`dvml.heads.metric_losses`  metric losses by name, over T synthetic batches at once
* :mod:`dvml.heads.loss`           :class:`DVMLLoss` returning the named terms
* :mod:`dvml.heads.sampler`        seeded class-balanced batches
* :mod:`dvml.heads.train`          :func:`fit`
* :mod:`dvml.heads.run`            the run directory: :func:`load_run`, :func:`embed`, :class:`RunInfo`
"""

from dvml.heads.config import DeviceChoice, FitConfig, Lambdas, LossName
from dvml.heads.loss import DVMLLoss
from dvml.heads.metric_losses import MetricLoss, make_metric_loss
from dvml.heads.model import DVMLHeads, HeadsOutput
from dvml.heads.run import RunError, RunInfo, embed, load_checkpoint, load_run
from dvml.heads.train import FitEvent, fit, seed_everything

__all__ = [
    "DVMLHeads", "DVMLLoss", "DeviceChoice", "FitConfig", "FitEvent", "HeadsOutput", "Lambdas", "LossName",
    "MetricLoss", "RunError", "RunInfo", "embed", "fit", "load_checkpoint", "load_run", "make_metric_loss",
    "seed_everything",
]
