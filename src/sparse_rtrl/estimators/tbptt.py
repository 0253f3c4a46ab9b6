r"""Truncated backpropagation through time, run online (a gradient every step)."""

import dataclasses
from typing import final

import torch
from torch import nn

from ..cells import cell_kind
from .base import EstimatorState, OnlineEstimator


@dataclasses.dataclass
class TBPTTState(EstimatorState):
    """Fields (besides `state` and `step_count`), ring buffers indexed by
    step number modulo `window`:
    window_input: (window, B, I), the inputs x of the last `window` steps.
    window_state: (window, B, S), the state each of those steps started from.
    """

    window_input: torch.Tensor | None = None
    window_state: torch.Tensor | None = None


@final
class TBPTT(OnlineEstimator):
    r"""Truncated BPTT with a window of h steps, giving a gradient at every step.

    Stores the last h inputs and the state h steps back. At every `backward`
    it re-runs the cell over the window from that (detached) state with the
    current parameters and backpropagates the credit by autograd:

    .. math::
        s_{t-h} \text{ fixed}, \quad
        s_\tau = f(x_\tau, s_{\tau-1}; \theta), \; \tau = t-h+1, \dots, t  \qquad (1)

        g_t = c_t \frac{d s_t}{d \theta}\Big|_{s_{t-h}}
            = c_t \sum_{\tau=t-h+1}^{t} \Big(\prod_{u=\tau+1}^{t} J_u\Big)
              \bar I_\tau                                                  \qquad (2)

    i.e. exact RTRL's influence with every path older than h steps cut. With
    h >= t (the whole stream so far) and no parameter updates in between,
    (2) is exact RTRL's c_t M_t, and the sum over the stream equals BPTT.

    Properties: biased for h < t (truncation), deterministic. Memory
    O(h B (I + S)); compute per step O(h) cell forward and backward passes,
    O(h B S (I + S)) for RNN-type cells. Supports every cell.

    Args:
        cell: the recurrent cell.
        window: h >= 1, the number of steps backpropagated through.

    Limitations: the forward pass over the window is recomputed at every
    step (h times the cost of one step); with online updates the recomputed
    states differ from the ones the stream saw (they use the current
    parameters), as in the usual online TBPTT.

    References:
        Williams, R. J. and Peng, J. (1990). An efficient gradient-based
        algorithm for on-line training of recurrent network trajectories.
        Neural Computation 2(4). Elman, J. L. (1990). Finding structure in time.
    """

    name = "tbptt"

    def __init__(
        self, cell: nn.Module, *, window: int = 16, state_size: int | None = None
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"TBPTT: `window` must be an int >= 1, got {window!r}.")
        if window < 1:
            raise ValueError(
                f"TBPTT: `window` must be >= 1 (steps backpropagated through), "
                f"got {window}."
            )
        self.window = window
        super().__init__(cell, state_size=state_size)
        self._generic = cell_kind(cell) == "generic"

    def _initial_memory(self, batch_size: int | None) -> TBPTTState:
        if batch_size is None:
            return TBPTTState()
        size_in = getattr(self.cell, "input_size", None)
        inputs = None
        if size_in is not None:
            inputs = self._new_tensor(self.window, batch_size, size_in)
        return TBPTTState(
            state=self.adapter.initial_state(batch_size),
            window_input=inputs,
            window_state=self._new_tensor(
                self.window, batch_size, self.adapter.state_size
            ),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        if memory.window_input is None:  # a generic cell without `input_size`
            memory.window_input = x.new_zeros(self.window, *x.shape)
        slot = memory.step_count % self.window
        memory.window_input[slot].copy_(x)
        memory.window_state[slot].copy_(memory.state)
        return self._forward(x, memory.state)

    def _forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One differentiable step, state as (B, S).

        The analytic cells run the adapter's maths (torch's equations, tested
        equal to the modules; torch's own LSTMCell backward is slow on CPU);
        a generic cell runs its module.
        """
        if self._generic:
            return self.cell(x, state)
        return self.adapter.step(x, state, jacobian=False).state

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (1): re-run the window from the detached state h steps back ...
        memory = self.memory
        count = memory.step_count
        length = min(count, self.window)
        slots = [(count - length + j) % self.window for j in range(length)]
        params = self.adapter.params
        with torch.enable_grad():
            state = memory.window_state[slots[0]].clone()
            for slot in slots:
                state = self._forward(memory.window_input[slot], state)
            # ... Eq. (2): backpropagate the credit through it.
            grads = torch.autograd.grad(
                state, params, grad_outputs=credit, allow_unused=True
            )
        return torch.cat(
            [
                torch.zeros_like(p).flatten() if g is None else g.flatten()
                for p, g in zip(params, grads, strict=True)
            ]
        )
