"""Exact retrieval and clustering primitives.

* :mod:`dvml.retrieval.knn`      exact faiss kNN and k-means (the only module that imports faiss).
* :mod:`dvml.retrieval.metrics`  pure numpy Recall@K, NMI, pairwise F1, MAP@R, R-precision.
* :mod:`dvml.retrieval.protocol` the query/gallery split of a test split with roles, self-exclusion included.
"""
