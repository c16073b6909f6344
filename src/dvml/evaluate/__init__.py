"""Stage three: exact retrieval and clustering metrics of test embeddings.

* :mod:`dvml.evaluate.knn`      exact faiss kNN and k-means (the only faiss importer).
* :mod:`dvml.evaluate.metrics`  pure numpy Recall@K, NMI, pairwise F1, MAP@R, R-precision.
* :mod:`dvml.evaluate.core`     :func:`evaluate_embeddings` (in memory), :func:`evaluate_target` / :func:`run`
  (a run directory or a cache file -> metrics + provenance, ``metrics.json``).
"""

from dvml.evaluate.core import (
    DEFAULT_KS,
    METRICS_FILE,
    SOP_KS,
    EvalConfig,
    EvaluationError,
    default_ks,
    evaluate_embeddings,
    evaluate_target,
    parse_ks,
    run,
)
from dvml.evaluate.knn import Metric

__all__ = [
    "DEFAULT_KS", "METRICS_FILE", "SOP_KS", "EvalConfig", "EvaluationError", "Metric", "default_ks",
    "evaluate_embeddings", "evaluate_target", "parse_ks", "run",
]
