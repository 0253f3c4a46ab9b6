"""Statistics and verdict rules on hand-made numbers (DESIGN.md section 5)."""

import math

import numpy as np
import pytest

from sparse_rtrl.experiments import claims as C
from sparse_rtrl.experiments import stats
from sparse_rtrl.experiments.studies import measured_text, method_stats


def test_recovery_is_the_share_of_the_gap_closed():
    assert stats.recovery(2.0, 1.2, 1.0) == pytest.approx(0.8)
    assert stats.recovery(2.0, 1.0, 1.0) == 1.0
    assert stats.recovery(2.0, 2.0, 1.0) == 0.0
    assert stats.recovery(2.0, 2.5, 1.0) == pytest.approx(-0.5)  # worse than frozen


def test_recovery_is_na_without_a_real_gap():
    assert stats.recovery(1.0, 0.9, 1.1) is None  # negative gap
    assert stats.recovery(1.0, 0.99, 0.96) is None  # 4 % < 5 %
    assert stats.recovery(1.0, 0.97, 0.94) == pytest.approx(0.5)  # 6 %
    assert stats.recovery(1.0, math.nan, 0.5) is None


def test_excess_and_gap():
    assert stats.excess(1.4, 1.0) == pytest.approx(0.4)
    assert stats.gap(2.0, 1.5) == pytest.approx(0.25)


def test_mean_std_uses_ddof_1_and_cv_is_std_over_mean():
    mean, std = stats.mean_std([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)
    assert stats.cv([1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert math.isnan(stats.mean_std([4.0])[1])


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constants():
    assert stats.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    values = [0.6, 0.8, 0.9, 0.7, 1.0]
    lo, hi = stats.bootstrap_ci(values)
    assert 0.6 <= lo < np.mean(values) < hi <= 1.0
    assert stats.bootstrap_ci(values) == (lo, hi)  # fixed seed: reproducible
    # The percentile CI of the mean of 2 values: the 2.5 % / 97.5 % quantiles of
    # {a, (a+b)/2, b} drawn with probabilities 1/4, 1/2, 1/4.
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_verdict_lower_bound():
    assert C.verdict_lower_bound((0.78, 0.9), 0.84, 0.84) == C.REPRODUCED
    assert C.verdict_lower_bound((0.55, 0.6), 0.84, 0.57) == C.SUPPORTED
    assert C.verdict_lower_bound((0.1, 0.3), 0.84, 0.2) == C.NOT_SUPPORTED
    assert C.verdict_lower_bound((0.3, 0.7), 0.84, 0.5) == C.INCONCLUSIVE
    assert C.verdict_lower_bound((0.3, 0.95), 0.84, 0.7) == C.REPRODUCED  # in CI
    assert C.verdict_lower_bound(None, 0.84, None) == C.NOT_MEASURED


def test_verdict_step_function_c4():
    assert C.verdict_step_function((-0.1, 0.1), (0.6, 0.9)) == C.REPRODUCED
    assert C.verdict_step_function((0.8, 0.95), (0.85, 0.95)) == C.NOT_SUPPORTED
    assert C.verdict_step_function((0.1, 0.3), (0.6, 0.9)) == C.INCONCLUSIVE


def test_verdict_selection_cv_and_regime():
    assert C.verdict_all_lower_bounds({"a": (0.6, 1), "b": (0.7, 1)}) == C.REPRODUCED
    assert C.verdict_all_lower_bounds({"a": (0.6, 1), "b": (0.1, 0.4)}) == (
        C.NOT_SUPPORTED
    )
    assert C.verdict_cv(0.1, (0.05, 0.2), 0.9, (0.5, 1.2), (0.13, 0.88)) == (
        C.REPRODUCED
    )
    assert C.verdict_cv(0.1, (0.05, 0.6), 0.4, (0.2, 0.7)) == C.INCONCLUSIVE
    assert C.verdict_cv(0.5, (0.3, 0.7), 0.2, (0.1, 0.3)) == C.NOT_SUPPORTED
    assert C.verdict_all_larger({"full": (0.0, 0.3), "k=4": (0.1, 0.5)}) == (
        C.REPRODUCED
    )
    assert C.verdict_all_larger({"full": (0.0, 0.3), "k=4": (0.5, 0.4)}) == (
        C.NOT_SUPPORTED
    )
    assert C.verdict_beats_reference((1.05, 1.2), 1.1) == C.SUPPORTED


def _summary(final):
    return {"loss_final": final, "loss_all": final, "diverged": False}


def test_method_stats_counts_diverged_and_na_seeds():
    entry = {
        "methods": {
            "frozen": {0: _summary(2.0), 1: _summary(2.0), 2: _summary(1.0)},
            "full": {0: _summary(1.0), 1: _summary(1.0), 2: _summary(0.99)},
            "k=4": {
                0: _summary(1.2),
                1: {"status": "diverged", "diverged": True},
                2: _summary(0.995),
            },
        }
    }
    st = method_stats(entry, "k=4")
    assert st["n_div"] == 1 and st["n"] == 3
    assert st["recoveries"] == [pytest.approx(0.8), None]  # seed 2: gap 1 %
    assert st["values"] == [pytest.approx(0.8)]
    text = measured_text(st)
    assert "1/3 diverged" in text and "n/a (gap 1.0 %)" in text
