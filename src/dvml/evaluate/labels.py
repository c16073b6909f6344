"""The one display name of each metric, for every table dvml prints or writes (``dvml evaluate``, the ablation
tables, ``summary.md``): the keys of ``metrics.json`` stay as they are (``r_precision``), people read the labels.

>>> [metric_label(k) for k in ("recall@1", "nmi", "map@r", "r_precision")]
['R@1', 'NMI', 'MAP@R', 'R-prec']
"""

from __future__ import annotations

LABELS = {"nmi": "NMI", "f1": "F1", "precision": "pair precision", "recall": "pair recall", "map@r": "MAP@R",
          "r_precision": "R-prec"}


def metric_label(key: str) -> str:
    """``recall@K`` -> ``R@K``; the other metric keys by :data:`LABELS`; an unknown key as it is."""
    if key.startswith("recall@"):
        return "R@" + key[len("recall@"):]
    return LABELS.get(key, key)


def fixed(value: float, digits: int = 1, *, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals, never a signed zero: ``-0.0`` (a tiny negative rounded away) prints
    ``0.0``; with ``signed``, non-zero values carry their sign (``+1.2``, ``-0.3``) and a rounded zero none.

    >>> fixed(-0.0001), fixed(0.04, signed=True), fixed(-0.04, signed=True), fixed(1.25, signed=True)
    ('0.0', '0.0', '0.0', '+1.2')
    """
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if text.lstrip("+-").strip("0.") == "" and text.lstrip("+-") != "nan":  # a zero after rounding
        return text.lstrip("+-")
    return text
