r"""UORO: unbiased online recurrent optimization (a rank-one influence)."""

import dataclasses
from typing import final

import torch
from torch import nn

from ..cells.analytic import ElmanAdapter
from ..cells.base import GateJacobian
from .base import EstimatorState, OnlineEstimator, make_generator


@dataclasses.dataclass
class UOROState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    state_factor: (B, S), s~_t, the state side of the rank-one estimate.
    param_factor: (B, P), theta~_t, its parameter side (M~_t = s~_t theta~_t^T).
    """

    state_factor: torch.Tensor | None = None
    param_factor: torch.Tensor | None = None


@final
class UORO(OnlineEstimator):
    r"""UORO: an unbiased rank-one estimate of the influence matrix.

    Keeps M~_t = s~_t theta~_t^T per stream (the paper's \tilde s and
    \tilde\theta) and replaces the rank-two update J_t M~_{t-1} + \bar I_t by a
    random rank-one combination with independent random signs
    nu_t in {-1, +1}^S:

    .. math::
        \rho_0 = \sqrt{\frac{\|\tilde\theta_{t-1}\| + \epsilon}
                             {\|J_t \tilde s_{t-1}\| + \epsilon}}, \quad
        \rho_1 = \sqrt{\frac{\|\nu_t^\top \bar I_t\| + \epsilon}
                             {\|\nu_t\| + \epsilon}}                       \qquad (1)

        \tilde s_t = \rho_0 J_t \tilde s_{t-1} + \rho_1 \nu_t             \qquad (2)

        \tilde\theta_t = \tilde\theta_{t-1} / \rho_0
            + \nu_t^\top \bar I_t / \rho_1                                 \qquad (3)

        g_t = (c_t \cdot \tilde s_t)\, \tilde\theta_t                     \qquad (4)

    Because E[nu nu^T] = I and rho_1 is even in nu, E[M~_t | past] =
    J_t M~_{t-1} + \bar I_t, so M~_t and g_t are unbiased (for fixed
    parameters). rho_0 and rho_1 balance the norms of the two factors to
    minimise the variance. nu^T \bar I_t is a vector-Jacobian product taken
    from the compact immediate Jacobian (`CellAdapter.immediate_vjp`).

    Properties: unbiased, high variance (it grows with S and with the time
    horizon). Memory O(B (S + P)); compute O(B S^2) for J_t s~ plus O(B P)
    (O(B S P) for a generic cell's dense immediate Jacobian). Supports every
    cell.

    Args:
        cell: the recurrent cell.
        epsilon: the epsilon of (1), guarding zero norms (at the first step
            both factors are zero).
        generator: the source of the random signs (a torch.Generator, a seed,
            or None for a seed drawn from torch's global generator).

    Limitations: the variance makes it a weak learner for large networks
    without small learning rates; the estimate is unbiased only while the
    parameters stay fixed (online updates add the usual bias of RTRL with
    changing weights). float32 accumulation of theta~ over long streams is
    not compensated.

    References:
        Tallec, C. and Ollivier, Y. (2017). Unbiased online recurrent
        optimization. ICLR 2018. arXiv:1702.05043.
    """

    name = "uoro"

    def __init__(
        self,
        cell: nn.Module,
        *,
        epsilon: float = 1e-7,
        generator: torch.Generator | int | None = None,
        state_size: int | None = None,
    ) -> None:
        if not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"UORO: `epsilon` must be a float > 0, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        super().__init__(cell, state_size=state_size)
        self.generator = make_generator(generator, self.adapter.device, "UORO")

    def _initial_memory(self, batch_size: int | None) -> UOROState:
        if batch_size is None:
            return UOROState()
        return UOROState(
            state=self.adapter.initial_state(batch_size),
            state_factor=self._new_tensor(batch_size, self.adapter.state_size),
            param_factor=self._new_tensor(batch_size, self.adapter.num_params),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory, eps = self.memory, self.epsilon
        elman = isinstance(self.adapter, ElmanAdapter)
        step = self.adapter.step(x, memory.state, jacobian=not elman)
        signs = self._draw_signs(memory.state_factor.shape)  # nu_t (B, S)
        if elman:  # J s~ without forming J
            forward = _elman_jvp(self.adapter, step.immediate, memory.state_factor)
        else:
            forward = torch.bmm(
                step.recurrent_jacobian, memory.state_factor.unsqueeze(2)
            ).squeeze(2)
        immediate = self.adapter.immediate_vjp(step.immediate, signs)  # (B, P)

        # Eq. (1): per-stream norm balancing.
        rho0 = _balance(memory.param_factor, forward, eps)
        rho1 = _balance(immediate, signs, eps)

        # Eqs. (2) and (3).
        memory.state_factor = forward.mul_(rho0).addcmul_(signs, rho1)
        memory.param_factor.div_(rho0).addcdiv_(immediate, rho1)
        return step.state

    def _draw_signs(self, shape: torch.Size) -> torch.Tensor:
        """Independent uniform random signs, the nu_t of Eq. (2)."""
        bits = torch.randint(
            0, 2, shape, generator=self.generator, device=self.generator.device
        )
        signs = bits.to(self.adapter.dtype).mul_(2).sub_(1)
        return signs.to(self.adapter.device)

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (4), summed over the streams.
        memory = self.memory
        weight = (credit * memory.state_factor).sum(1)  # (B,)
        return weight @ memory.param_factor


def _elman_jvp(
    adapter: ElmanAdapter, immediate: GateJacobian, vector: torch.Tensor
) -> torch.Tensor:
    """J v for an Elman cell, J = (1 - alpha) I + diag(d) W_hh: O(B H^2)."""
    weight_hh = adapter.cell.weight_hh
    mask = adapter.hidden_weight_mask()
    if mask is not None:
        weight_hh = weight_hh * mask
    out = immediate.wrt_hidden_preact[:, :, 0] * (vector @ weight_hh.T)
    if adapter.alpha != 1.0:
        out = out + (1.0 - adapter.alpha) * vector
    return out


def _balance(
    numerator: torch.Tensor, denominator: torch.Tensor, eps: float
) -> torch.Tensor:
    """sqrt((|a| + eps) / (|b| + eps)) per stream, as a (B, 1) column."""
    top = numerator.norm(dim=1, keepdim=True) + eps
    return torch.sqrt(top / (denominator.norm(dim=1, keepdim=True) + eps))
