"""``dvml.experiments.stats``: mean ± std and paired t-intervals against scipy and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dvml.experiments.stats import mean_std, paired_difference


def test_mean_std_against_numpy_ddof1():
    v = [0.61, 0.64, 0.58, 0.66]
    ms = mean_std(v)
    assert ms.n == 4
    assert ms.mean == pytest.approx(np.mean(v))
    assert ms.std == pytest.approx(np.std(v, ddof=1))
    assert ms.format() == f"{np.mean(v) * 100:.1f} ± {np.std(v, ddof=1) * 100:.1f}"


def test_mean_std_single_value_has_no_spread():
    ms = mean_std([0.5])
    assert ms.mean == 0.5 and math.isnan(ms.std) and ms.format() == "50.0"
    with pytest.raises(ValueError, match="NaN"):
        mean_std([0.5, float("nan")])


def test_against_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.6, 5)
    treat = base + rng.normal(0.03, 0.02, 5)
    d = paired_difference(treat, base)
    ref = stats.ttest_rel(treat, base)
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    assert d.n == 5 and d.mean == pytest.approx(np.mean(treat - base))


def test_against_hand_computation_two_seeds():
    # differences 0.02 and 0.04: mean 0.03, sd sqrt(2)*0.01, t_{0.975,1} = 12.7062047...
    d = paired_difference([0.62, 0.54], [0.60, 0.50])
    half = 12.706204736174707 * (math.sqrt(2) * 0.01) / math.sqrt(2)
    assert d.mean == pytest.approx(0.03)
    assert d.std == pytest.approx(math.sqrt(2) * 0.01)
    assert (d.low, d.high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert not d.significant  # 2 seeds cannot exclude 0 with this spread
    assert d.format() == f"+3.0 [{(0.03 - half) * 100:+.1f}, {(0.03 + half) * 100:+.1f}]"


def test_confidence_level_widens_interval():
    a, b = [0.7, 0.72, 0.69, 0.75], [0.6, 0.65, 0.61, 0.66]
    d90, d99 = paired_difference(a, b, confidence=0.90), paired_difference(a, b, confidence=0.99)
    assert d99.low < d90.low < d90.mean < d90.high < d99.high
    assert d90.significant


def test_degenerate_inputs():
    one = paired_difference([0.7], [0.6])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and one.format() == "+10.0"
    same = paired_difference([0.7, 0.8], [0.6, 0.7])  # identical differences: zero-width, no p-value
    assert same.low == pytest.approx(0.1) and same.high == pytest.approx(0.1) and math.isnan(same.p_value)
    with pytest.raises(ValueError, match="shapes"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1], [0.1], confidence=1.0)
