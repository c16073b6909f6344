"""Stage three: embed a target (a feature cache, a heads run, a finetune run) and score it.

* :mod:`dvml.evaluate.core`   :func:`evaluate_embeddings` (in memory), :func:`evaluate_target` / :func:`run`
  (a run directory or a cache file -> metrics + provenance, ``metrics.json``).
* :mod:`dvml.evaluate.plots`  t-SNE / PCA scatter and bar charts.
"""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.evaluate.core": ["DEFAULT_KS", "INSHOP_KS", "SOP_KS", "EvalConfig", "EvaluationError", "default_ks",
        "evaluate_embeddings", "evaluate_target", "parse_ks", "run", "worst_classes", "write_per_class_csv"],
    "dvml.retrieval.knn": ["Metric"],
    "dvml.runs": ["METRICS_FILE"],
})

__all__ = [
    "DEFAULT_KS", "INSHOP_KS", "METRICS_FILE", "SOP_KS", "EvalConfig", "EvaluationError", "Metric", "default_ks",
    "evaluate_embeddings", "evaluate_target", "parse_ks", "run", "worst_classes", "write_per_class_csv",
]
