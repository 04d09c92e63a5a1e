"""gptx.stats against references it does not share code with: tabulated t quantiles, closed
forms of the incomplete beta, and p-values from numerical integration of the t density."""
import math

import numpy as np
import pytest

from gptx import stats


def t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))


def p_by_integration(t: float, df: float, points: int = 200_001) -> float:
    """Two-sided p = 1 - 2 * integral of the density over [0, |t|], by Simpson's rule."""
    x = np.linspace(0.0, abs(t), points)
    y = t_density(x, df)
    h = x[1] - x[0]
    integral = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 1.0 - 2.0 * integral


@pytest.mark.parametrize("q, df, expected", [
    (0.975, 2, 4.302653), (0.975, 10, 2.228139), (0.975, 1, 12.706205), (0.975, 30, 2.042272),
    (0.95, 5, 2.015048), (0.995, 3, 5.840909), (0.9, 20, 1.325341),
])
def test_t_quantiles_match_the_printed_table(q, df, expected):
    assert stats.t_quantile(q, df) == pytest.approx(expected, abs=5e-7)
    assert stats.t_quantile(1 - q, df) == pytest.approx(-expected, abs=5e-7)  # symmetric


@pytest.mark.parametrize("t, df", [(0.5, 1), (2.1, 3.3), (4.59, 3.74), (10.0, 2), (1.3, 50), (3.0, 0.5),
                                   (0.01, 7), (2.5, 250.5)])
def test_two_sided_p_matches_numerical_integration(t, df):
    expected = p_by_integration(t, df)
    assert stats.t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-8, abs=1e-12)
    assert stats.t_two_sided_p(-t, df) == stats.t_two_sided_p(t, df)
    assert stats.t_cdf(t, df) == pytest.approx(1 - expected / 2, abs=1e-12)


@pytest.mark.parametrize("x", [1e-6, 0.05, 0.3, 0.5, 0.77, 0.999])
def test_incomplete_beta_closed_forms(x):
    assert stats.betainc(1, 1, x) == pytest.approx(x, rel=1e-13)
    assert stats.betainc(3.5, 1, x) == pytest.approx(x ** 3.5, rel=1e-12)
    assert stats.betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
    assert stats.betainc(2, 7, x) + stats.betainc(7, 2, 1 - x) == pytest.approx(1.0, abs=1e-13)
    assert stats.betainc(4.2, 4.2, 0.5) == pytest.approx(0.5, abs=1e-14)


def test_incomplete_beta_rejects_what_it_is_not_defined_for():
    for a, b, x in [(0, 1, 0.5), (1, -1, 0.5), (1, 1, 1.5), (1, 1, float("nan"))]:
        with pytest.raises(ValueError):
            stats.betainc(a, b, x)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_summary_and_welch_against_an_independent_computation():
    base = [1.9014, 1.9050, 1.9141]  # the README's three seeds of one recipe
    other = [1.8800, 1.8900, 1.8850]
    s = stats.summarize(base)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(base)) and s.std == pytest.approx(np.std(base, ddof=1))
    half = 4.302653 * np.std(base, ddof=1) / math.sqrt(3)
    assert s.ci95 == pytest.approx((np.mean(base) - half, np.mean(base) + half), abs=1e-6)

    w = stats.welch(base, other)
    va, vb = np.var(base, ddof=1) / 3, np.var(other, ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    t = (np.mean(other) - np.mean(base)) / math.sqrt(va + vb)
    assert w.diff == pytest.approx(np.mean(other) - np.mean(base)) and w.df == pytest.approx(df) and w.t == pytest.approx(t)
    assert w.p_value == pytest.approx(p_by_integration(t, df), rel=1e-8)
    assert 0.001 < w.p_value < 0.05  # a 0.02 drop against a 0.007 spread: significant with 3 seeds


def test_undefined_cases_say_so_instead_of_inventing_numbers():
    one = stats.summarize([1.5])
    assert (one.n, one.mean, one.std, one.ci95) == (1, 1.5, None, None)
    assert stats.summarize([]).mean is None
    assert stats.welch([1.0], [2.0, 2.1]).p_value is None  # one value has no spread
    flat = stats.welch([1.0, 1.0], [2.0, 2.0])  # no spread in either group: no test
    assert flat.diff == 1.0 and flat.p_value is None
    same = stats.welch([1.0, 1.2, 1.1], [1.0, 1.2, 1.1])
    assert same.diff == 0.0 and same.p_value == pytest.approx(1.0)
