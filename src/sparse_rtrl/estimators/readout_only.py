r"""Readout-only learning: the recurrent cell does not learn."""

import dataclasses
from typing import final

import torch
from torch import nn

from ..cells import cell_kind
from .base import EstimatorState, OnlineEstimator


@dataclasses.dataclass
class ReadoutOnlyState(EstimatorState):
    """No fields besides `state` (B, S) and `step_count`."""


@final
class ReadoutOnly(OnlineEstimator):
    r"""The reference with no recurrent learning: the cell's gradient is not computed.

    Runs the cell forward and returns h_t like every estimator; `backward`
    still runs `loss.backward()`, so a readout (or anything else built on h)
    learns by autograd, but nothing is added to the cell's parameters:

    .. math::
        s_t = f(x_t, s_{t-1}; \theta), \qquad g_t = \text{none}        \qquad (1)

    Their `.grad` stays as it was (None after `zero_grad()`), so an optimizer
    leaves them unchanged (no weight decay is applied to a None gradient).
    This is an echo-state / reservoir baseline when the readout learns, and
    the "frozen" reference of the benchmark when nothing learns.

    Properties: a gradient of zero for the cell (maximally biased), no
    variance. Memory O(B S); compute one cell step, O(B S (I + S)) for
    RNN-type cells. Supports every cell.

    Args:
        cell: the recurrent cell.

    Limitations: by construction the recurrent dynamics never adapt.

    References:
        Jaeger, H. (2001). The "echo state" approach to analysing and training
        recurrent neural networks. GMD Report 148.
    """

    name = "readout_only"

    def __init__(self, cell: nn.Module, *, state_size: int | None = None) -> None:
        super().__init__(cell, state_size=state_size)
        self._generic = cell_kind(cell) == "generic"

    def _initial_memory(self, batch_size: int | None) -> ReadoutOnlyState:
        if batch_size is None:
            return ReadoutOnlyState()
        return ReadoutOnlyState(state=self.adapter.initial_state(batch_size))

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        # Eq. (1): the state only (a generic cell runs its module: the adapter
        # would also take its (B, S, P) immediate Jacobian).
        if self._generic:
            return self.cell(x, self.memory.state)
        return self.adapter.step(x, self.memory.state, jacobian=False).state

    def _gradient(self, credit: torch.Tensor) -> None:
        return None
