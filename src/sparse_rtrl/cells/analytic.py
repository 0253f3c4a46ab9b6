r"""Analytic Jacobians of torch's RNN, GRU and LSTM cells and of `LeakyRNNCell`.

Each adapter recomputes the cell's own forward maths (torch's equations and
gate order, checked against the module in the tests) and returns the
recurrent Jacobian J_t densely and the immediate Jacobian compactly, as the
derivatives of the state with respect to the gate pre-activations
(`GateJacobian`). Shapes: x (B, I), h (B, H), s (B, S), gates (B, G*H).
"""

import torch
from torch import nn

from .base import CellAdapter, CellStep, GateJacobian
from .leaky import LeakyRNNCell


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return nn.functional.linear(x, weight, bias)


class ElmanAdapter(CellAdapter):
    r"""`torch.nn.RNNCell` (tanh or relu) and `LeakyRNNCell`.

    .. math::
        a = W_{ih} x + b_{ih} + W_{hh} h + b_{hh}, \quad
        h' = (1 - \alpha) h + \alpha \phi(a)

    (alpha = 1 for `RNNCell`), so with d = alpha phi'(a):
    J = (1 - alpha) I + diag(d) W_hh and d h'_i / d a_i = d_i.
    """

    def __init__(self, cell: nn.RNNCell | LeakyRNNCell) -> None:
        super().__init__(
            cell, state_size=cell.hidden_size, hidden_size=cell.hidden_size
        )
        self.alpha = getattr(cell, "alpha", 1.0)
        self.nonlinearity = getattr(cell, "nonlinearity", "tanh")
        self._maskable = hasattr(cell, "recurrent_mask")  # LeakyRNNCell's buffer

    def hidden_weight_mask(self) -> torch.Tensor | None:
        return self.cell.recurrent_mask if self._maskable else None

    def step(
        self, x: torch.Tensor, state: torch.Tensor, *, jacobian: bool = True
    ) -> CellStep:
        cell = self.cell
        weight_hh = self._weight_hh()
        # phi(a) in one op, as torch's RNNCell computes it (the same bits).
        args = (x, state, cell.weight_ih, weight_hh, cell.bias_ih, cell.bias_hh)
        if self.nonlinearity == "tanh":
            act = torch.rnn_tanh_cell(*args)
            slope = 1.0 - act * act
        else:
            act = torch.rnn_relu_cell(*args)
            slope = (act > 0).to(act.dtype)  # relu(a) > 0 exactly when a > 0
        if self.alpha == 1.0:
            new_state = act
        else:
            new_state = (1 - self.alpha) * state + self.alpha * act
            slope = self.alpha * slope
        wrt_preact = slope.unsqueeze(2)  # (B, H, 1), d = alpha phi'(a)

        recurrent = None
        if jacobian:
            recurrent = wrt_preact * weight_hh  # diag(d) W_hh, (B, H, H)
            if self.alpha != 1.0:
                recurrent.diagonal(dim1=1, dim2=2).add_(1 - self.alpha)
        immediate = GateJacobian(wrt_preact, wrt_preact, x, state)
        return CellStep(new_state, recurrent, immediate)

    def _weight_hh(self) -> torch.Tensor:
        mask = self.hidden_weight_mask()
        weight = self.cell.weight_hh
        return weight if mask is None else weight * mask


class GRUAdapter(CellAdapter):
    r"""`torch.nn.GRUCell`, gate order (r, z, n) as torch.

    .. math::
        r = \sigma(i_r + g_r), \; z = \sigma(i_z + g_z), \;
        n = \tanh(i_n + r \odot g_n), \; h' = (1 - z) \odot n + z \odot h

    with i = W_ih x + b_ih and g = W_hh h + b_hh split in three.
    """

    def __init__(self, cell: nn.GRUCell) -> None:
        super().__init__(
            cell, state_size=cell.hidden_size, hidden_size=cell.hidden_size
        )

    def step(
        self, x: torch.Tensor, state: torch.Tensor, *, jacobian: bool = True
    ) -> CellStep:
        cell = self.cell
        in_r, in_z, in_n = _linear(x, cell.weight_ih, cell.bias_ih).chunk(3, 1)
        hid_r, hid_z, hid_n = _linear(state, cell.weight_hh, cell.bias_hh).chunk(3, 1)
        r = torch.sigmoid(in_r + hid_r)
        z = torch.sigmoid(in_z + hid_z)
        n = torch.tanh(in_n + r * hid_n)
        new_state = n + z * (state - n)

        # Derivatives of h' by the pre-activations of n, z and r.
        d_n = (1 - z) * (1 - n * n)
        d_z = (state - n) * z * (1 - z)
        d_r = d_n * hid_n * r * (1 - r)
        wrt_input = torch.stack((d_r, d_z, d_n), dim=2)  # (B, H, 3)
        wrt_hidden = torch.stack((d_r, d_z, d_n * r), dim=2)

        recurrent = None
        if jacobian:
            weights = cell.weight_hh.view(3, self.hidden_size, self.hidden_size)
            recurrent = torch.einsum("bhg,ghl->bhl", wrt_hidden, weights)
            recurrent.diagonal(dim1=1, dim2=2).add_(z)
        immediate = GateJacobian(wrt_input, wrt_hidden, x, state)
        return CellStep(new_state, recurrent, immediate)


class LSTMAdapter(CellAdapter):
    r"""`torch.nn.LSTMCell`, state s = (h, c) concatenated, S = 2H.

    Gate order (i, f, g, o) as torch, all from W_ih x + b_ih + W_hh h + b_hh:

    .. math::
        c' = \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \quad
        h' = \sigma(o) \odot \tanh(c')

    The recurrent Jacobian has blocks [[dh'/dh, diag(k f)], [dc'/dh, diag(f)]]
    with k = o (1 - tanh(c')^2).
    """

    def __init__(self, cell: nn.LSTMCell) -> None:
        super().__init__(
            cell, state_size=2 * cell.hidden_size, hidden_size=cell.hidden_size
        )

    def step(
        self, x: torch.Tensor, state: torch.Tensor, *, jacobian: bool = True
    ) -> CellStep:
        cell, size = self.cell, self.hidden_size
        h, c = state[:, :size], state[:, size:]
        gates = _linear(x, cell.weight_ih, cell.bias_ih)
        gates = gates + _linear(h, cell.weight_hh, cell.bias_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        tanh_c = torch.tanh(c_new)
        h_new = o * tanh_c

        # d c' / d (i, f, g, o) pre-activations, then d h' = k d c' (+ the o gate).
        k = o * (1 - tanh_c * tanh_c)
        d_c = torch.stack(
            (g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), torch.zeros_like(o)), 2
        )
        d_h = k.unsqueeze(2) * d_c
        d_h[:, :, 3] = tanh_c * o * (1 - o)
        wrt_preact = torch.cat((d_h, d_c), dim=1)  # (B, 2H, 4)

        recurrent = None
        if jacobian:
            weights = cell.weight_hh.view(4, size, size)
            recurrent = state.new_zeros(state.shape[0], 2 * size, 2 * size)
            per_block = wrt_preact.view(-1, 2, size, 4)  # (B, (h, c), H, G)
            recurrent[:, :, :size] = torch.einsum(
                "bqhg,ghl->bqhl", per_block, weights
            ).reshape(-1, 2 * size, size)
            recurrent[:, :size, size:].diagonal(dim1=1, dim2=2).copy_(k * f)
            recurrent[:, size:, size:].diagonal(dim1=1, dim2=2).copy_(f)
        immediate = GateJacobian(wrt_preact, wrt_preact, x, h)
        return CellStep(torch.cat((h_new, c_new), dim=1), recurrent, immediate)
