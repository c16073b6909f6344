"""query_gallery against a plain loop over the rows."""

from __future__ import annotations

import numpy as np

from dvml.cache import schema as S
from dvml.retrieval.protocol import query_gallery


def test_query_gallery_against_a_loop():
    roles = np.random.default_rng(0).choice(np.array(S.ROLE_VALUES, dtype=np.int8), size=50)
    q, g, exclude = query_gallery(roles)
    assert q.tolist() == [i for i, r in enumerate(roles) if r in (S.ROLE_QUERY, S.ROLE_QUERY | S.ROLE_GALLERY)]
    assert g.tolist() == [i for i, r in enumerate(roles) if r in (S.ROLE_GALLERY, S.ROLE_QUERY | S.ROLE_GALLERY)]
    assert exclude.tolist() == [g.tolist().index(i) if i in g else -1 for i in q]
    assert (exclude >= 0).any() and (exclude == -1).any()  # both kinds of query occur
