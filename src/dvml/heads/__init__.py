"""Stage two: the DVML heads, decoder and four-term objective, trained in memory on cached features.

* :mod:`dvml.heads.config`     :class:`FitConfig` (frozen, validated) and the phase/λ schedule
* :mod:`dvml.heads.model`      :class:`DVMLHeads` (z_I, μ, log σ², reparameterised z_V, decoder)
* :mod:`dvml.heads.objective`  KL and reconstruction terms and :class:`DVMLLoss` returning the named terms
* :mod:`dvml.heads.sampler`    seeded class-balanced batches
* :mod:`dvml.heads.train`      :func:`fit` (writes a run directory, :mod:`dvml.runs`)
* :mod:`dvml.heads.embed`      :func:`embed`: z_I of features with a run's heads
* :mod:`dvml.heads.presets`    ``--preset paper|dvml``: the paper's settings, or fit-heads' defaults
* :mod:`dvml.heads.diagnostics` per-epoch branch statistics and the learned-vs-noise measures (the run report and
  its thresholds: :mod:`dvml.experiments.branch_report`)
"""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.heads.config": ["DeviceChoice", "FitConfig", "Lambdas"],
    "dvml.heads.core": ["FitEvent"],
    "dvml.heads.embed": ["embed"],
    "dvml.heads.model": ["DVMLHeads", "HeadsOutput"],
    "dvml.heads.objective": ["DVMLLoss"],
    "dvml.heads.train": ["fit"],
})

__all__ = ["DVMLHeads", "DVMLLoss", "DeviceChoice", "FitConfig", "FitEvent", "HeadsOutput", "Lambdas", "embed", "fit"]
