"""Stage three: embed a target (a feature cache, a heads run, a finetune run) and score it.

* :mod:`dvml.evaluate.core`   :func:`evaluate_embeddings` (in memory), :func:`evaluate_target` / :func:`run`
  (a run directory or a cache file -> metrics + provenance, ``metrics.json``).
* :mod:`dvml.evaluate.plots`  t-SNE / PCA scatter and bar charts.
"""

from dvml.evaluate.core import (
    DEFAULT_KS,
    INSHOP_KS,
    SOP_KS,
    EvalConfig,
    EvaluationError,
    default_ks,
    evaluate_embeddings,
    evaluate_target,
    parse_ks,
    run,
    worst_classes,
    write_per_class_csv,
)
from dvml.retrieval.knn import Metric
from dvml.runs import METRICS_FILE

__all__ = [
    "DEFAULT_KS", "INSHOP_KS", "METRICS_FILE", "SOP_KS", "EvalConfig", "EvaluationError", "Metric", "default_ks",
    "evaluate_embeddings", "evaluate_target", "parse_ks", "run", "worst_classes", "write_per_class_csv",
]
