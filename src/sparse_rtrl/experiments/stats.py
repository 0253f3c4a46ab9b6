r"""Statistics of the benchmark (DESIGN.md section 5).

- recovery = (L_frozen - L_method) / (L_frozen - L_full) per seed; None ("n/a")
  when the gap L_frozen - L_full is negative or below 5 % of L_frozen.
- mean ± std over seeds with ddof=1; a 95 % percentile bootstrap CI of the
  mean (10,000 resamples); the coefficient of variation std / mean.
- excess loss over exact RTRL: L_method / L_full - 1.
"""

import math
from collections.abc import Sequence

import numpy as np


MIN_GAP = 0.05  # the gap must be at least 5 % of L_frozen


def gap(l_frozen: float, l_full: float) -> float:
    """The relative gap (L_frozen - L_full) / L_frozen."""
    return (l_frozen - l_full) / l_frozen if l_frozen != 0 else math.nan


def recovery(l_frozen: float, l_method: float, l_full: float) -> float | None:
    """(L_frozen - L_method) / (L_frozen - L_full), or None (n/a: no real gap)."""
    values = (l_frozen, l_method, l_full)
    if not all(math.isfinite(v) for v in values) or l_frozen <= 0:
        return None
    if l_frozen - l_full < MIN_GAP * l_frozen:
        return None
    return (l_frozen - l_method) / (l_frozen - l_full)


def excess(l_method: float, l_full: float) -> float:
    """L_method / L_full - 1 (how far above exact RTRL's loss)."""
    return l_method / l_full - 1.0


def _values(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=np.float64)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1; NaN std for a single value)."""
    array = _values(values)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation std / mean (ddof=1)."""
    mean, std = mean_std(values)
    return std / mean if mean != 0 else math.nan


def bootstrap_ci(
    values: Sequence[float],
    n: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    statistic=np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` (the mean by default) over seeds.

    Resamples the values with replacement `n` times (a fixed `seed`, so the
    report is reproducible) and returns the (1-level)/2 and (1+level)/2
    quantiles of the statistic. One value gives (v, v).
    """
    array = _values(values)
    if array.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, array.size, size=(n, array.size))
    stats = statistic(array[picks], axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _cv_rows(samples: np.ndarray, axis: int = 1) -> np.ndarray:
    mean = samples.mean(axis=axis)
    std = samples.std(axis=axis, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return std / mean


def cv_ci(values: Sequence[float], n: int = 10_000, seed: int = 0):
    """Percentile bootstrap CI of the CV (resamples with a constant draw give 0)."""
    return bootstrap_ci(values, n=n, seed=seed, statistic=_cv_rows)


def fmt_mean_std(values: Sequence[float], percent: bool = False) -> str:
    """ "m ± s" (in % when `percent`)."""
    mean, std = mean_std(values)
    scale, unit = (100.0, " %") if percent else (1.0, "")
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{mean * scale:.3g}{unit}"
    if percent:
        return f"{mean * scale:.0f} ± {std * scale:.0f}{unit}"
    return f"{mean:.3g} ± {std:.2g}"


def fmt_ci(ci: tuple[float, float] | None, percent: bool = False) -> str:
    if ci is None or any(math.isnan(v) for v in ci):
        return "n/a"
    if percent:
        return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}] %"
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def fmt_diverged(n_div: int, n: int) -> str:
    """ "n_div/n diverged" (empty when none did)."""
    return f"{n_div}/{n} diverged" if n_div else ""
