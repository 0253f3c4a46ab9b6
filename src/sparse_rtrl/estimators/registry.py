"""The one map from estimator names to classes.

The CLI, the README's support matrix and the contract tests all read
`ESTIMATORS`; a new estimator is usable everywhere once it is listed here.
"""

from typing import Any

from torch import nn

from .base import OnlineEstimator
from .kf_rtrl import KFRTRL
from .readout_only import ReadoutOnly
from .rflo import RFLO
from .rtrl import RTRL
from .snap import SnAp
from .sparse_rtrl import SparseRTRL
from .tbptt import TBPTT
from .uoro import UORO


ESTIMATORS: dict[str, type[OnlineEstimator]] = {
    "rtrl": RTRL,
    "sparse_rtrl": SparseRTRL,
    "snap": SnAp,
    "uoro": UORO,
    "kf_rtrl": KFRTRL,
    "rflo": RFLO,
    "tbptt": TBPTT,
    "readout_only": ReadoutOnly,
}


def get_estimator(name: str) -> type[OnlineEstimator]:
    """The class registered under `name`."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown estimator {name!r}; available: {', '.join(sorted(ESTIMATORS))}."
        ) from None


def make_estimator(name: str, cell: nn.Module, **options: Any) -> OnlineEstimator:
    """Build the estimator `name` around `cell` with its keyword options."""
    return get_estimator(name)(cell, **options)


def supporting(cell_kind: str) -> list[str]:
    """Registry keys of the estimators that support a cell kind."""
    return sorted(
        k for k, cls in ESTIMATORS.items() if cell_kind in cls.supported_cells
    )


def support_matrix() -> str:
    """A markdown table: estimator x cell kind, read from the registry."""
    from ..cells import CELL_KINDS

    lines = [
        "| estimator | class | exact | " + " | ".join(CELL_KINDS) + " |",
        "|---|---|---|" + "---|" * len(CELL_KINDS),
    ]
    for key in sorted(ESTIMATORS):
        cls = ESTIMATORS[key]
        marks = ["yes" if kind in cls.supported_cells else "-" for kind in CELL_KINDS]
        exact = "yes" if cls.exact else "-"
        lines.append(
            f"| `{key}` | `{cls.__name__}` | {exact} | " + " | ".join(marks) + " |"
        )
    return "\n".join(lines)
