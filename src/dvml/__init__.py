"""dvml: Deep Variational Metric Learning as a fast cached-feature two-stage pipeline.

Stages (each a subpackage with a frozen config dataclass and a ``run``-style entry point):

* :mod:`dvml.extract`  images -> HDF5 feature cache (GoogLeNet, crop/flip views); also ``synth``.
* :mod:`dvml.cache`    the feature-cache format: schema constants, writer, reader, fingerprint.
* :mod:`dvml.heads`    DVML heads + decoder + four-term loss trained on cached features.
* :mod:`dvml.evaluate` Recall@K (exact FAISS kNN), NMI/F1 (k-means), MAP@R, R-precision.
"""

__version__ = "0.1.0"
