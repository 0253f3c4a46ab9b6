"""Recurrent cells and the analytic adapters the estimators use.

`adapt(cell)` picks the adapter for a module: the analytic one for torch's
`RNNCell`, `GRUCell`, `LSTMCell` and this library's `LeakyRNNCell`, and the
generic `torch.func` one for any other `cell(x, state) -> state`.
"""

from torch import nn

from .analytic import ElmanAdapter, GRUAdapter, LSTMAdapter
from .base import CellAdapter, CellStep, GateJacobian
from .functional import FunctionalAdapter
from .leaky import LeakyRNNCell


# Cell kind (the class name, or "generic") -> analytic adapter.
ANALYTIC_ADAPTERS: dict[type, type[CellAdapter]] = {
    nn.RNNCell: ElmanAdapter,
    LeakyRNNCell: ElmanAdapter,
    nn.GRUCell: GRUAdapter,
    nn.LSTMCell: LSTMAdapter,
}
CELL_KINDS = ("RNNCell", "LeakyRNNCell", "GRUCell", "LSTMCell", "generic")


def cell_kind(cell: nn.Module) -> str:
    """The support-matrix name of a cell: its class name, or "generic"."""
    for cls in ANALYTIC_ADAPTERS:
        if type(cell) is cls:
            return cls.__name__
    return "generic"


def adapt(cell: nn.Module, *, state_size: int | None = None) -> CellAdapter:
    """The adapter for `cell`: analytic when its class is known, else generic."""
    if not isinstance(cell, nn.Module):
        raise TypeError(
            f"`cell` must be a torch.nn.Module such as nn.RNNCell, got "
            f"{type(cell).__name__}."
        )
    adapter = ANALYTIC_ADAPTERS.get(type(cell))
    if adapter is not None:
        return adapter(cell)
    return FunctionalAdapter(cell, state_size=state_size)


__all__ = [
    "CELL_KINDS",
    "CellAdapter",
    "CellStep",
    "FunctionalAdapter",
    "GateJacobian",
    "LeakyRNNCell",
    "adapt",
    "cell_kind",
]
