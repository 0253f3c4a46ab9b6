"""The analytic Jacobians and the compact immediate Jacobian equal torch.func's."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from conftest import INPUT_SIZE, make_cell, state_size
from sparse_rtrl import adapt


TOLERANCE = 1e-12  # float64, one step: only rounding differs


def _cell_step(cell, names, params, x, state):
    """s_t as a function of (theta, s_{t-1}) through the module's own forward."""
    theta = dict(zip(names, params, strict=True))
    if isinstance(cell, nn.LSTMCell):
        size = cell.hidden_size
        hidden, memory = functional_call(
            cell, theta, (x, (state[:, :size], state[:, size:]))
        )
        return torch.cat((hidden, memory), dim=1)
    return functional_call(cell, theta, (x, state))


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm", "leaky"])
@pytest.mark.parametrize("bias", [True, False])
def test_analytic_jacobians_equal_jacrev(kind, bias):
    cell = make_cell(kind, bias=bias, seed=3)
    adapter = adapt(cell)
    names = [name for name, _ in cell.named_parameters()]
    params = tuple(p.detach() for p in cell.parameters())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, INPUT_SIZE, generator=gen, dtype=torch.float64)
    state = 0.5 * torch.randn(2, state_size(cell), generator=gen, dtype=torch.float64)

    step = adapter.step(x, state)
    expected_state = _cell_step(cell, names, params, x, state)
    assert torch.allclose(step.state, expected_state, rtol=0, atol=TOLERANCE)

    for b in range(2):

        def one(theta, s, b=b):
            return _cell_step(cell, names, theta, x[b : b + 1], s[None])[0]

        wrt_params, wrt_state = jacrev(one, argnums=(0, 1))(params, state[b])
        dense = torch.cat([j.reshape(j.shape[0], -1) for j in wrt_params], dim=1)
        immediate = adapter.dense_immediate(step.immediate)[b]
        assert (step.recurrent_jacobian[b] - wrt_state).abs().max() <= TOLERANCE
        assert (immediate - dense).abs().max() <= TOLERANCE


def test_masked_leaky_cell_jacobians():
    """A sparse recurrent network: the mask enters J and the immediate Jacobian."""
    from sparse_rtrl import LeakyRNNCell

    torch.manual_seed(0)
    mask = (torch.rand(5, 5) < 0.4).double()
    cell = LeakyRNNCell(INPUT_SIZE, 5, recurrent_mask=mask).double()
    adapter = adapt(cell)
    names = [name for name, _ in cell.named_parameters()]
    params = tuple(p.detach() for p in cell.parameters())
    x = torch.randn(1, INPUT_SIZE, dtype=torch.float64)
    state = torch.randn(1, 5, dtype=torch.float64)
    step = adapter.step(x, state)
    wrt_params, wrt_state = jacrev(
        lambda theta, s: _cell_step(cell, names, theta, x, s[None])[0], argnums=(0, 1)
    )(params, state[0])
    dense = torch.cat([j.reshape(5, -1) for j in wrt_params], dim=1)
    assert torch.allclose(step.recurrent_jacobian[0], wrt_state, atol=TOLERANCE)
    assert torch.allclose(
        adapter.dense_immediate(step.immediate)[0], dense, atol=TOLERANCE
    )


def test_flattening_order_round_trips():
    """The flat P axis is the concatenation of named_parameters, row-major."""
    cell = make_cell("lstm", seed=1)
    adapter = adapt(cell)
    flat = torch.cat([p.detach().reshape(-1) for p in cell.parameters()])
    assert flat.numel() == adapter.num_params
    for piece, param in zip(
        adapter.flat_to_params(flat), cell.parameters(), strict=True
    ):
        assert torch.equal(piece, param.detach())
    assert adapter.names == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def test_two_unit_rnn_by_hand():
    """A 2-unit tanh RNN, one input: the influence after one step is d h / d theta."""
    cell = nn.RNNCell(1, 2, bias=False).double()
    with torch.no_grad():
        cell.weight_ih.copy_(torch.tensor([[0.5], [-1.0]]))
        cell.weight_hh.zero_()
    adapter = adapt(cell)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    step = adapter.step(x, torch.zeros(1, 2, dtype=torch.float64))
    slope = 1 - torch.tanh(torch.tensor([1.0, -2.0], dtype=torch.float64)) ** 2
    # Columns: W_ih[0,0], W_ih[1,0], W_hh[0,0], W_hh[0,1], W_hh[1,0], W_hh[1,1].
    expected = torch.zeros(2, 6, dtype=torch.float64)
    expected[0, 0] = slope[0] * 2.0
    expected[1, 1] = slope[1] * 2.0
    assert torch.allclose(adapter.dense_immediate(step.immediate)[0], expected)
