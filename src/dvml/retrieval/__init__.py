"""Exact retrieval and clustering primitives.

* :mod:`dvml.retrieval.knn`      exact faiss kNN and k-means (the only module that imports faiss).
* :mod:`dvml.retrieval.metrics`  pure numpy Recall@K, NMI, pairwise F1, MAP@R, R-precision.
"""
