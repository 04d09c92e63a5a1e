"""The few statistics a comparison of seeded runs needs, with numpy and the standard library only.

Student's t distribution comes from the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz); quantiles by bisection on the CDF. Accurate to ~1e-12 for
the degrees of freedom seeds give (up to thousands): far beyond what three seeds can tell apart.
``tests/test_stats.py`` checks them against tabulated quantiles and against numerical
integration of the t density.

Why Welch's test (``welch``) and not a paired one, though a sweep's variants share their seeds:
a seed fixes the data order for every variant, but not the initial weights (a different
architecture draws different tensors from it), so a seed's luck need not carry from one variant
to the next; with three seeds a paired test has 2 degrees of freedom against Welch's ~4, and
loses power unless that correlation is strong. Welch's test also needs no pairing at all, so
``gptx compare`` can test groups with different seeds or counts, and it does not assume equal
variances (one variant may train less stably than another). One test, chosen in advance.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

_EPS = 1e-15  # relative accuracy of the continued fraction
_TINY = 1e-300  # keeps Lentz's ratios away from 0/0
_MAX_TERMS = 10_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))) with the incomplete beta's coefficients
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)),
    d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),
    evaluated front to back by the modified Lentz method. Converges fast for x < (a + 1) / (a + b + 2)."""
    f, c, d = _TINY, _TINY, 0.0  # f = b0 = 0, replaced by tiny
    for j in range(1, _MAX_TERMS):
        if j == 1:
            numerator = 1.0  # the leading 1 / (...)
        else:
            n = j - 1  # index of d_n
            m = n // 2
            if n % 2 == 0:
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
            else:
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + numerator / c
        c = c if abs(c) > _TINY else _TINY
        f *= c * d
        if abs(c * d - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, one_minus_x: Optional[float] = None) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1.
    ``one_minus_x``: 1 - x computed without cancellation by a caller who can (x close to 1)."""
    y = 1.0 - x if one_minus_x is None else one_minus_x
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = a * math.log(x) + b * math.log(y) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)
    return 1.0 - math.exp(log_front) / b * _beta_continued_fraction(b, a, y)  # I_x(a,b) = 1 - I_{1-x}(b,a)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (real, > 0) degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t), one_minus_x=t * t / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, by bisection on ``t_cdf`` (monotone, so it cannot miss)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass
class Summary:
    """Mean, sample standard deviation (n - 1) and the t-based 95% interval of the mean."""

    n: int
    mean: Optional[float]
    std: Optional[float]  # None with fewer than 2 values
    ci95: Optional[tuple[float, float]]


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Summary(0, None, None, None)
    mean = float(x.mean())
    if x.size < 2:
        return Summary(1, mean, None, None)
    std = float(x.std(ddof=1))
    half = t_quantile(0.975, x.size - 1) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, (mean - half, mean + half))


@dataclasses.dataclass
class Welch:
    """Welch's two-sample t-test of mean(b) - mean(a), unequal variances."""

    diff: float
    se: Optional[float]
    df: Optional[float]  # Welch–Satterthwaite degrees of freedom
    t: Optional[float]
    p_value: Optional[float]  # two-sided; None when undefined (fewer than 2 values, or no spread at all)
    ci95: Optional[tuple[float, float]]  # of the difference


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2:
        return Welch(diff, None, None, None, None, None)
    va, vb = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size  # squared standard errors
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values within each group: the test is undefined, not "infinitely significant"
        return Welch(diff, 0.0, None, None, None, None)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    t = diff / se
    half = t_quantile(0.975, df) * se
    return Welch(diff, se, df, t, t_two_sided_p(t, df), (diff - half, diff + half))
