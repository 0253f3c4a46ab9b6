r"""RFLO: random-feedback local online learning (its eligibility trace)."""

import dataclasses
from typing import final

import torch
from torch import nn

from .base import EstimatorState, OnlineEstimator


@dataclasses.dataclass
class RFLOState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    eligibility_trace: (B, H, W), P_t[j, k] for weight row j and column k of
        [W_ih | W_hh | b_ih | b_hh] (W = I + H + 2; I + H without biases).
    """

    eligibility_trace: torch.Tensor | None = None


@final
class RFLO(OnlineEstimator):
    r"""RFLO: a leaky, purely local eligibility trace per synapse.

    Drops every recurrent contribution to the influence except the leak: unit
    j's state depends only on its own row of W = [W_ih | W_hh | b_ih | b_hh]
    (H, W_cols), through a trace that decays with the cell's leak. For
    h_t = (1 - alpha) h_{t-1} + alpha phi(a_t), a_t = W \hat x_t,
    \hat x_t = [x_t, h_{t-1}, 1, 1]:

    .. math::
        P_t[j, k] = (1 - \alpha) P_{t-1}[j, k]
            + \alpha \phi'(a_{t,j}) \hat x_t[k], \quad P_0 = 0              \qquad (1)

        g_t[j, k] = c_t[j]\, P_t[j, k]                                     \qquad (2)

    This is SnAp-1 with the diagonal of J_t replaced by its leak part
    (1 - alpha): the term alpha phi'(a_j) W_hh[j, j] is dropped too. For
    `RNNCell` (alpha = 1) the trace is the one-step immediate Jacobian.

    Credit: the original RFLO (Murray 2019) projects the output error back
    through fixed random feedback weights, c_t = B (y_t - y^_t); here c_t is
    the exact d L_t / d h_t from autograd, as for every estimator of this
    library, so the method isolates the trace approximation (1). A random
    feedback matrix can be emulated by the caller's loss.

    Properties: biased; deterministic. Memory O(B H (I + H)) = O(B P);
    compute O(B P) per step (no recurrent Jacobian is formed). Supports
    `RNNCell` (tanh, relu) and `LeakyRNNCell`.

    Args:
        cell: an `RNNCell` or `LeakyRNNCell`.

    Limitations: GRU, LSTM and generic cells are not supported (the trace is
    derived for the leaky rate network); they raise NotImplementedError.
    Masked weights of a sparse `LeakyRNNCell` get zero gradient.

    References:
        Murray, J. M. (2019). Local online learning in recurrent networks with
        random feedback. eLife 8:e43299. https://doi.org/10.7554/eLife.43299
        (preprint: bioRxiv 458570).
    """

    name = "rflo"
    supported_cells = ("RNNCell", "LeakyRNNCell")

    def __init__(self, cell: nn.Module, *, state_size: int | None = None) -> None:
        super().__init__(cell, state_size=state_size)
        self.leak = float(self.adapter.alpha)  # alpha

    def _initial_memory(self, batch_size: int | None) -> RFLOState:
        if batch_size is None:
            return RFLOState()
        hidden = self.adapter.hidden_size
        width = self.adapter.num_params // hidden
        return RFLOState(
            state=self.adapter.initial_state(batch_size),
            eligibility_trace=self._new_tensor(batch_size, hidden, width),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        step = self.adapter.step(x, memory.state, jacobian=False)
        jac = step.immediate
        slope = jac.wrt_input_preact  # alpha phi'(a_t), (B, H, 1)
        parts = [jac.input, jac.hidden]
        if "bias_ih" in self.adapter.names:
            parts.append(x.new_ones(x.shape[0], 2))
        inputs = torch.cat(parts, dim=1)  # x^_t, (B, W)

        # Eq. (1).
        trace = memory.eligibility_trace
        if self.leak != 1.0:
            trace.mul_(1.0 - self.leak).addcmul_(slope, inputs.unsqueeze(1))
        else:
            torch.mul(slope, inputs.unsqueeze(1), out=trace)
        return step.state

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (2), summed over the streams; masked weights get no gradient.
        rows = torch.einsum("bj,bjk->jk", credit, self.memory.eligibility_trace)
        mask = self.adapter.hidden_weight_mask()
        if mask is not None:
            size_in = self.cell.weight_ih.shape[1]
            rows[:, size_in : size_in + self.adapter.hidden_size].mul_(mask)
        return self.adapter.gate_rows_to_flat(rows)
