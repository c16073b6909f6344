"""The query/gallery protocol of a test split with roles: which rows query, which are searched, and self-exclusion.

A schema-2 cache marks each test row (:data:`dvml.cache.schema.ROLE_QUERY`, ``ROLE_GALLERY``, both): queries are
searched against the gallery, and a row that is both never retrieves itself. (Without roles every row is query and
gallery: :func:`dvml.retrieval.knn.search` with ``exclude_self=True``.) Used by evaluation and by a fit's
watch-only test Recall@1, so both score the same protocol.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dvml.cache import schema as S


class QueryGallery(NamedTuple):
    """Row indices of a test split's queries ``(Q,)`` and gallery ``(G,)``, and ``exclude`` ``(Q,)``: each query's
    own position in the gallery (``-1`` when it is not a gallery row), the ``exclude`` of
    :func:`dvml.retrieval.knn.search`."""

    query: np.ndarray
    gallery: np.ndarray
    exclude: np.ndarray


def query_gallery(roles: np.ndarray) -> QueryGallery:
    """Split rows by their ``(N,)`` roles (``schema.ROLE_*``); see :class:`QueryGallery`.

    >>> query_gallery(np.array([1, 2, 3]))
    QueryGallery(query=array([0, 2]), gallery=array([1, 2]), exclude=array([-1,  1]))
    """
    roles = np.asarray(roles)
    q, g = np.flatnonzero(roles & S.ROLE_QUERY), np.flatnonzero(roles & S.ROLE_GALLERY)
    pos = np.full(roles.shape[0], -1, dtype=np.int64)
    pos[g] = np.arange(g.size)
    return QueryGallery(q, g, pos[q])
