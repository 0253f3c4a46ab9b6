r"""Exact real-time recurrent learning."""

import dataclasses
from typing import final

import torch
from torch import nn

from .. import kernels
from .base import EstimatorState, OnlineEstimator


@dataclasses.dataclass
class RTRLState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    influence: (B, S, P), M_t = d s_t / d theta, stored column-major (the
        transposed view of a (B, P, S) buffer) on the CPU up to 128 units,
        where the step is faster so (`kernels.exact_column_major`).
    _spare: (B, S, P), the buffer M_{t+1} is written into (then swapped).
    """

    influence: torch.Tensor | None = None
    _spare: torch.Tensor | None = None


@final
class RTRL(OnlineEstimator):
    r"""Exact real-time recurrent learning (forward-mode gradients).

    Carries the influence matrix M_t = d s_t / d theta forward in time, so the
    gradient of every loss is available at the step it is incurred:

    .. math::
        M_t = J_t M_{t-1} + \bar I_t, \quad M_0 = 0              \qquad (1)

        g_t = c_t M_t, \quad c_t = \partial L_t / \partial s_t    \qquad (2)

    with J_t = d s_t / d s_{t-1} (B, S, S) and the immediate Jacobian
    \bar I_t = \partial s_t / \partial \theta (added in its compact form for the
    torch cells). Summed over t, (2) equals the BPTT gradient of sum_t L_t.

    Properties: exact (unbiased, zero variance). Memory O(B S P) (two influence
    buffers); compute O(B S^2 P) per step. Supports every cell.

    Limitations: the cost grows as H^4 for a vanilla RNN (S = H, P ~ H^2); at
    H = 256 one step is a (256 x 256) @ (256 x 66,304) product.

    References:
        Williams, R. J. and Zipser, D. (1989). A learning algorithm for
        continually running fully recurrent neural networks. Neural Computation.
    """

    name = "rtrl"
    exact = True

    def __init__(self, cell: nn.Module, *, state_size: int | None = None) -> None:
        super().__init__(cell, state_size=state_size)

    def _initial_memory(self, batch_size: int | None) -> RTRLState:
        if batch_size is None:
            return RTRLState()
        adapter = self.adapter
        shape = (batch_size, adapter.state_size, adapter.num_params)
        column = kernels.exact_column_major(adapter.state_size, adapter.device)
        kind = {
            "column_major": column,
            "dtype": adapter.dtype,
            "device": adapter.device,
        }
        return RTRLState(
            state=adapter.initial_state(batch_size),
            influence=kernels.new_influence(*shape, **kind),
            _spare=kernels.new_influence(*shape, **kind),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        first = memory.step_count == 0
        step = self.adapter.step(x, memory.state, jacobian=not first)

        # Eq. (1): propagate the influence (M_0 = 0 on the first step) ...
        if first:
            memory._spare.zero_()
        else:
            kernels.propagate_exact(
                step.recurrent_jacobian, memory.influence, memory._spare
            )
        # ... then add the immediate Jacobian in place.
        kernels.add_immediate(self.adapter, memory._spare, step.immediate)
        memory.influence, memory._spare = memory._spare, memory.influence
        return step.state

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (2).
        return kernels.influence_gradient(credit, self.memory.influence)
