"""Shared fixtures: small cells of every kind, streams, and a BPTT reference."""

import pytest
import torch
from torch import nn

from sparse_rtrl import LeakyRNNCell


# Tiny tensors: thread start-up costs more than the work, and one thread makes
# the suite's timing independent of the machine's load.
torch.set_num_threads(1)


INPUT_SIZE = 3


class TwoLayerCell(nn.Module):
    """A custom cell for the generic path: h' = tanh(W2 softplus(W1 [x, h]))."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.state_size = hidden_size
        self.inner = nn.Linear(input_size + hidden_size, 2 * hidden_size, bias=bias)
        self.outer = nn.Linear(2 * hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.softplus(self.inner(torch.cat((x, state), dim=-1)))
        return torch.tanh(self.outer(hidden))


CELL_FACTORIES = {
    "rnn_tanh": lambda n, bias: nn.RNNCell(INPUT_SIZE, n, bias=bias),
    "rnn_relu": lambda n, bias: nn.RNNCell(
        INPUT_SIZE, n, bias=bias, nonlinearity="relu"
    ),
    "gru": lambda n, bias: nn.GRUCell(INPUT_SIZE, n, bias=bias),
    "lstm": lambda n, bias: nn.LSTMCell(INPUT_SIZE, n, bias=bias),
    "leaky": lambda n, bias: LeakyRNNCell(INPUT_SIZE, n, alpha=0.3, bias=bias),
    "generic": lambda n, bias: TwoLayerCell(INPUT_SIZE, n, bias=bias),
}


def make_cell(
    kind: str,
    hidden_size: int = 5,
    *,
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    torch.manual_seed(seed)
    cell = CELL_FACTORIES[kind](hidden_size, bias).to(dtype)
    if kind == "rnn_relu":  # keep relu units active and the dynamics bounded
        with torch.no_grad():
            cell.bias_ih.add_(0.5) if bias else None
            cell.weight_hh.mul_(0.5)
    return cell


def state_size(cell: nn.Module) -> int:
    return (
        2 * cell.hidden_size
        if isinstance(cell, nn.LSTMCell)
        else (getattr(cell, "state_size", None) or cell.hidden_size)
    )


def hidden_size(cell: nn.Module) -> int:
    return getattr(cell, "hidden_size", None) or cell.state_size


def make_stream(batch: int, steps: int, *, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, INPUT_SIZE, generator=gen, dtype=dtype)
    ys = torch.randn(steps, batch, 2, generator=gen, dtype=dtype)
    return xs, ys


def make_readout(cell: nn.Module, seed: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    param = next(cell.parameters())
    return nn.Linear(hidden_size(cell), 2).to(param.dtype)


def bptt_gradients(cell, readout, xs, ys) -> list[torch.Tensor]:
    """Autograd through the unrolled sequence: grads of sum_t L_t by cell params."""
    batch = xs.shape[1]
    param = next(cell.parameters())
    zeros = torch.zeros(batch, hidden_size(cell), dtype=param.dtype)
    state = (zeros, zeros.clone()) if isinstance(cell, nn.LSTMCell) else zeros
    total = 0.0
    for x, y in zip(xs, ys, strict=True):
        state = cell(x, state)
        hidden = state[0] if isinstance(state, tuple) else state
        total = total + ((readout(hidden) - y) ** 2).sum()
    return list(torch.autograd.grad(total, list(cell.parameters())))


def online_gradients(learner, cell, readout, xs, ys) -> list[torch.Tensor]:
    """Accumulate learner.backward over the stream without optimizer steps."""
    for param in cell.parameters():
        param.grad = None
    for x, y in zip(xs, ys, strict=True):
        hidden = learner.step(x)
        learner.backward(((readout(hidden) - y) ** 2).sum())
    return [p.grad.clone() for p in cell.parameters()]


def rel_error(a, b) -> float:
    """max|a - b| / max|b| over a list of tensors."""
    num = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    den = max(float(y.abs().max()) for y in b)
    return num / den if den > 0 else num


@pytest.fixture(params=sorted(CELL_FACTORIES))
def cell_kind(request):
    return request.param
