r"""KF-RTRL: Kronecker-factored real-time recurrent learning."""

import dataclasses
from typing import final

import torch
from torch import nn

from .base import EstimatorState, OnlineEstimator, make_generator


@dataclasses.dataclass
class KFRTRLState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    input_factor: (B, W), u_t, W = I + H + 2 (I + H without biases).
    hidden_factor: (B, H, H), A_t; M~_t[i, (j, k)] = A_t[i, j] u_t[k].
    """

    input_factor: torch.Tensor | None = None
    hidden_factor: torch.Tensor | None = None


@final
class KFRTRL(OnlineEstimator):
    r"""KF-RTRL: an unbiased Kronecker-factored estimate of the influence matrix.

    For a vanilla or leaky RNN the parameters form one matrix
    W = [W_ih | W_hh | b_ih | b_hh] (H, W_cols) acting on
    \hat x_t = [x_t, h_{t-1}, 1, 1], and the immediate Jacobian is a Kronecker
    product, \bar I_t[i, (j, k)] = D_t[i, j] \hat x_t[k] with
    D_t = diag(alpha phi'(a_t)). KF-RTRL keeps the influence as one Kronecker
    product per stream, M~_t = u_t \otimes A_t (M~[i, (j, k)] = A[i, j] u[k]),
    and replaces the sum of two Kronecker products J_t M~_{t-1} + \bar I_t by
    a random combination with independent random signs c_1, c_2 in {-1, +1}:

    .. math::
        p_1 = \sqrt{\frac{\|J_t A_{t-1}\| + \epsilon}{\|u_{t-1}\| + \epsilon}},
        \quad
        p_2 = \sqrt{\frac{\|D_t\| + \epsilon}{\|\hat x_t\| + \epsilon}}   \qquad (1)

        u_t = c_1 p_1 u_{t-1} + c_2 p_2 \hat x_t                          \qquad (2)

        A_t = c_1 J_t A_{t-1} / p_1 + c_2 D_t / p_2                       \qquad (3)

        g_t[j, k] = (c_t^\top A_t)_j\, u_t[k]                             \qquad (4)

    E[c_1 c_2] = 0 removes the cross terms, so E[M~_t | past] =
    J_t M~_{t-1} + \bar I_t: the estimate is unbiased (for fixed parameters),
    with far less variance than UORO. With a `recurrent_mask` the columns of
    masked weights are propagated as if unmasked (each column of M evolves on
    its own) and their gradient is zeroed, which keeps (4) unbiased.

    Properties: unbiased. Memory O(B (H^2 + I + H)); compute O(B H^3) for
    J_t A_{t-1}. Supports `RNNCell` (tanh, relu) and `LeakyRNNCell`.

    Args:
        cell: an `RNNCell` or `LeakyRNNCell`.
        epsilon: the epsilon of (1), guarding zero norms.
        generator: the source of the random signs (a torch.Generator, a seed,
            or None for a seed drawn from torch's global generator).

    Limitations: GRU and LSTM cells are not implemented (their immediate
    Jacobian is a sum of one Kronecker product per gate; the paper treats
    RHN/vanilla RNNs); they raise NotImplementedError. The O(H^3) product
    makes it slower than UORO per step at large H.

    References:
        Mujika, A., Meier, F. and Steger, A. (2018). Approximating real-time
        recurrent learning with random Kronecker factors. NeurIPS.
        arXiv:1805.10842.
    """

    name = "kf_rtrl"
    supported_cells = ("RNNCell", "LeakyRNNCell")

    def __init__(
        self,
        cell: nn.Module,
        *,
        epsilon: float = 1e-7,
        generator: torch.Generator | int | None = None,
        state_size: int | None = None,
    ) -> None:
        if not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"KFRTRL: `epsilon` must be a float > 0, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        super().__init__(cell, state_size=state_size)
        self.generator = make_generator(generator, self.adapter.device, "KFRTRL")

    def _initial_memory(self, batch_size: int | None) -> KFRTRLState:
        if batch_size is None:
            return KFRTRLState()
        hidden = self.adapter.hidden_size
        width = self.adapter.num_params // hidden
        return KFRTRLState(
            state=self.adapter.initial_state(batch_size),
            input_factor=self._new_tensor(batch_size, width),
            hidden_factor=self._new_tensor(batch_size, hidden, hidden),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory, eps = self.memory, self.epsilon
        step = self.adapter.step(x, memory.state, jacobian=True)
        jac = step.immediate
        slope = jac.wrt_input_preact[:, :, 0]  # diagonal of D_t, (B, H)
        inputs = self._extended_input(jac.input, jac.hidden)  # x^_t, (B, W)
        forward = torch.bmm(step.recurrent_jacobian, memory.hidden_factor)

        # Eq. (1): per-stream norm balancing.
        p1 = _ratio(forward.flatten(1), memory.input_factor, eps)
        p2 = _ratio(slope, inputs, eps)
        signs = self._draw_signs((x.shape[0], 2))
        c1, c2 = signs[:, :1], signs[:, 1:]

        # Eqs. (2) and (3).
        memory.input_factor = c1 * p1 * memory.input_factor + c2 * p2 * inputs
        hidden_factor = (c1 / p1).unsqueeze(2) * forward
        hidden_factor.diagonal(dim1=1, dim2=2).add_((c2 / p2) * slope)
        memory.hidden_factor = hidden_factor
        return step.state

    def _extended_input(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        parts = [x, hidden]
        if "bias_ih" in self.adapter.names:
            parts.append(x.new_ones(x.shape[0], 2))
        return torch.cat(parts, dim=1)

    def _draw_signs(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Independent uniform random signs, the c_1, c_2 of Eqs. (2)-(3)."""
        bits = torch.randint(
            0, 2, shape, generator=self.generator, device=self.generator.device
        )
        signs = bits.to(self.adapter.dtype).mul_(2).sub_(1)
        return signs.to(self.adapter.device)

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (4), summed over the streams; masked weights get no gradient.
        memory = self.memory
        rows = torch.einsum(
            "bi,bij,bk->jk", credit, memory.hidden_factor, memory.input_factor
        )
        mask = self.adapter.hidden_weight_mask()
        if mask is not None:
            size_in = self.cell.weight_ih.shape[1]
            rows[:, size_in : size_in + self.adapter.hidden_size].mul_(mask)
        return self.adapter.gate_rows_to_flat(rows)


def _ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, eps: float
) -> torch.Tensor:
    """sqrt((|a| + eps) / (|b| + eps)) per stream, as a (B, 1) column."""
    top = numerator.norm(dim=1, keepdim=True) + eps
    return torch.sqrt(top / (denominator.norm(dim=1, keepdim=True) + eps))
