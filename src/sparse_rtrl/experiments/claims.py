"""Report rows and the verdict rules of DESIGN.md section 5.

A claim row holds what the report shows for one claim of the paper: the
paper's figure, ours (mean ± std over seeds, the number of seeds, the 95 %
bootstrap CI), the losses behind it, and a verdict with the criterion that
decided it. The verdict rules are fixed before any run:

- reproduced: the paper's figure lies inside our 95 % CI, or our mean is within
  10 percentage points of it (and the criterion holds);
- direction supported: the criterion holds but the figure is not reproduced;
- not supported: the criterion fails;
- inconclusive: the CI straddles the criterion's threshold.
"""

from dataclasses import dataclass, field


REPRODUCED = "reproduced"
SUPPORTED = "direction supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"


@dataclass
class ClaimRow:
    """One row of the report (one claim, or one cell/setting of a claim)."""

    claim: str
    statement: str
    paper: str
    measured: str
    n_seeds: int
    ci: str
    losses: str
    verdict: str
    criterion: str
    notes: str = ""
    synthetic: bool = False
    figures: list[str] = field(default_factory=list)


def paper_match(
    ci: tuple[float, float] | None,
    paper_value: float,
    mean: float | None,
    tolerance: float = 0.10,
) -> bool:
    """Our CI holds the paper's figure, or our mean is within `tolerance` of it."""
    if mean is None:
        return False
    inside = ci is not None and ci[0] <= paper_value <= ci[1]
    return inside or abs(mean - paper_value) <= tolerance


def verdict_lower_bound(
    ci: tuple[float, float] | None,
    paper_value: float | None,
    mean: float | None,
    threshold: float = 0.5,
) -> str:
    """C1, C2, C7, C9, C11: the criterion is "recovery CI lower bound > threshold".

    Returns inconclusive when the CI straddles the threshold, not supported when
    it lies below it, and reproduced / direction supported when above.
    """
    if ci is None or mean is None:
        return NOT_MEASURED
    lo, hi = ci
    if paper_value is not None and paper_match(ci, paper_value, mean):
        return REPRODUCED
    if lo > threshold:
        return SUPPORTED
    if hi < threshold:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def verdict_all_lower_bounds(
    cis: dict[str, tuple[float, float] | None], threshold: float = 0.5
) -> str:
    """C3: every selection's recovery CI lower bound > threshold.

    The paper gives no figure ("all recover"), so the criterion holding is
    "reproduced".
    """
    if not cis or any(ci is None for ci in cis.values()):
        return NOT_MEASURED
    if all(ci[0] > threshold for ci in cis.values()):
        return REPRODUCED
    if any(ci[1] < threshold for ci in cis.values()):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def verdict_step_function(
    ci_k0: tuple[float, float] | None,
    ci_k1: tuple[float, float] | None,
    low: float = 0.2,
    high: float = 0.5,
) -> str:
    """C4: k=0's CI upper bound < 0.2 and k=1's CI lower bound > 0.5.

    Not supported when either part fails outright (k=0's CI entirely >= 0.2,
    or k=1's entirely <= 0.5); inconclusive when a CI straddles its threshold.
    """
    if ci_k0 is None or ci_k1 is None:
        return NOT_MEASURED
    if ci_k0[1] < low and ci_k1[0] > high:
        return REPRODUCED
    if ci_k0[0] >= low or ci_k1[1] <= high:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def verdict_range(median: float | None, low: float, high: float) -> str:
    """C5: the median (condition number) lies in [low, high]."""
    if median is None:
        return NOT_MEASURED
    return REPRODUCED if low <= median <= high else NOT_SUPPORTED


def verdict_cv(
    cv_sparse: float | None,
    ci_sparse: tuple[float, float] | None,
    cv_full: float | None,
    ci_full: tuple[float, float] | None,
    paper: tuple[float, float] | None = None,
) -> str:
    """C6: CV of sparse < CV of exact RTRL, both with bootstrap CIs.

    Inconclusive when the two CIs overlap but the point estimates order the
    right way; not supported when the point estimates order the wrong way.
    Reproduced when, in addition, each paper figure lies in its CI or within
    10 points of its estimate.
    """
    if None in (cv_sparse, cv_full, ci_sparse, ci_full):
        return NOT_MEASURED
    if cv_sparse >= cv_full:
        return NOT_SUPPORTED
    if ci_sparse[1] >= ci_full[0]:
        return INCONCLUSIVE
    if (
        paper is not None
        and paper_match(ci_sparse, paper[0], cv_sparse)
        and (paper_match(ci_full, paper[1], cv_full))
    ):
        return REPRODUCED
    return SUPPORTED


def verdict_beats_reference(
    ci: tuple[float, float] | None, mean: float | None, threshold: float = 1.0
) -> str:
    """C8: fraction 0.5's recovery > 1 (beats the dense reference)."""
    if ci is None or mean is None:
        return NOT_MEASURED
    if ci[0] > threshold:
        return SUPPORTED
    if ci[1] < threshold:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def verdict_all_larger(pairs: dict[str, tuple[float | None, float | None]]) -> str:
    """C10: every variant's excess is larger end-of-segment than continuous.

    `pairs` maps a variant to (excess with continuous error, excess with
    end-of-segment error), each a mean over seeds. The paper gives no number,
    so the criterion holding for every variant is "reproduced".
    """
    if not pairs or any(None in pair for pair in pairs.values()):
        return NOT_MEASURED
    if all(end > cont for cont, end in pairs.values()):
        return REPRODUCED
    return NOT_SUPPORTED
