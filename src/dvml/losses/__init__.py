"""Metric losses by name, over T synthetic batches at once.

* :mod:`dvml.losses.registry` one :class:`~dvml.losses.registry.LossSpec` per loss (factory, parameter defaults,
  traits): the one place a loss is declared; :func:`~dvml.losses.registry.register_loss` adds one
* :mod:`dvml.losses.names`   :class:`LossName`, the trait sets and parameter defaults derived from the registry;
  :class:`MetricReduction`, :class:`SyntheticPairs`
* :mod:`dvml.losses.metric`  :func:`make_metric_loss` and the batched triplet / N-pair losses; pml for the rest
* :mod:`dvml.losses.dr`      direction-regularised triplet / Proxy-NCA and Proxy-NCA++
"""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.losses.metric": ["MetricLoss", "make_metric_loss"],
    "dvml.losses.names": ["CROSS_PAIR_LOSSES", "LOSS_PARAM_DEFAULTS", "LOSS_PARAM_NAMES", "PROXY_LOSSES", "LossName",
        "MetricReduction", "SyntheticPairs"],
})

__all__ = ["CROSS_PAIR_LOSSES", "LOSS_PARAM_DEFAULTS", "LOSS_PARAM_NAMES", "PROXY_LOSSES", "LossName", "MetricLoss",
           "MetricReduction", "SyntheticPairs", "make_metric_loss"]
