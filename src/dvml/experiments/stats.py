"""Small statistics for ablations: mean ± std over seeds and paired differences with a t-interval.

An ablation runs the same loss with and without DVML for the same seeds, so the two results of one seed
share the seed's initialisation and batch order. The fair comparison is therefore *paired*: the per-seed
difference ``d_s = dvml_s − baseline_s`` and a Student-t confidence interval of its mean over seeds::

    mean(d) ± t_{(1+c)/2, n−1} · sd(d) / √n          sd with ddof = 1

which is the interval behind ``scipy.stats.ttest_rel`` (its p-value is reported too). With one seed
there is no spread to estimate: std, interval and p-value are NaN (shown as "n/a"), never a fake 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dvml._lazy import lazy_module
from dvml.evaluate.labels import fixed

_st = lazy_module("scipy.stats")  # imported on first use: the CLI reads this module's light parts to declare options


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof = 1) of ``n`` values; std is NaN when n < 2."""

    mean: float
    std: float
    n: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"61.2 ± 1.3"`` (values times ``scale``, e.g. fractions as percent)."""
        if self.n == 0:
            return "n/a"
        m = fixed(self.mean * scale, digits)
        return m if math.isnan(self.std) else f"{m} ± {fixed(self.std * scale, digits)}"


@dataclass(frozen=True)
class PairedDiff:
    """Paired difference treatment − baseline over ``n`` seeds.

    mean: mean of the per-seed differences; std: their sample std (ddof = 1);
    low/high: the ``confidence`` t-interval of the mean; p_value: two-sided paired t-test
    (NaN when n < 2, or when every difference is identical so no spread exists).
    """

    mean: float
    std: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"+3.1 [+0.4, +5.8]"`` (values times ``scale``; a value that rounds to zero prints ``0.0``, unsigned)."""
        if self.n == 0:
            return "n/a"
        m = fixed(self.mean * scale, digits, signed=True)
        if math.isnan(self.low):
            return m
        return f"{m} [{fixed(self.low * scale, digits, signed=True)}, {fixed(self.high * scale, digits, signed=True)}]"

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample std (ddof = 1) of ``values``; NaN values are an error (a failed run is not a zero)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {v.shape}")
    if np.isnan(v).any():
        raise ValueError("values contain NaN")
    if v.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return MeanStd(float(v.mean()), std, int(v.size))


def paired_difference(treatment: Sequence[float], baseline: Sequence[float], *,
                      confidence: float = 0.95) -> PairedDiff:
    """Paired ``treatment − baseline`` difference with a ``confidence`` t-interval across pairs.

    Args:
        treatment, baseline: (n,) values, element s of both from the same seed s.
        confidence: interval coverage in (0, 1).
    Returns:
        :class:`PairedDiff`; for n = 1 only the mean is defined (the rest NaN).
    """
    t = np.asarray(treatment, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if t.shape != b.shape or t.ndim != 1:
        raise ValueError(f"paired values need equal one-dimensional shapes, got {t.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if np.isnan(t).any() or np.isnan(b).any():
        raise ValueError("values contain NaN")
    d = t - b
    n = int(d.size)
    if n == 0:
        return PairedDiff(math.nan, math.nan, math.nan, math.nan, math.nan, 0, confidence)
    mean = float(d.mean())
    if n < 2:
        return PairedDiff(mean, math.nan, math.nan, math.nan, math.nan, n, confidence)
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # rounding noise of identical differences
        sd = 0.0
    half = float(_st.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        p = math.nan  # identical differences: the t statistic is undefined
    else:
        tstat = mean / (sd / math.sqrt(n))
        p = float(2 * _st.t.sf(abs(tstat), n - 1))
    return PairedDiff(mean, sd, mean - half, mean + half, p, n, confidence)
