"""Learning happens: exact and sparse RTRL lower the loss with the readout frozen."""

import math

import pytest
import torch
from torch import nn

from sparse_rtrl import RTRL, LeakyRNNCell, SparseRTRL


STEPS = 600
IMPROVEMENT = 0.8  # the bar: final loss at least 20 % below frozen


def _stream(steps=STEPS):
    """Input: a sine; target: the same sine two steps back, scaled (needs memory)."""
    t = torch.arange(steps + 2, dtype=torch.float32)
    wave = torch.sin(2 * math.pi * t / 17)
    return wave[2:].view(-1, 1, 1), 0.8 * wave[:-2].view(-1, 1, 1)


def _final_loss(make_learner, optimizer, lr):
    torch.manual_seed(0)
    cell = LeakyRNNCell(1, 16, alpha=0.5)
    readout = nn.Linear(16, 1)
    readout.requires_grad_(False)  # frozen: only the cell can adapt
    before = [p.detach().clone() for p in cell.parameters()]
    learner = make_learner(cell)
    opt = optimizer(cell.parameters(), lr=lr) if lr > 0 else None
    losses = []
    for x, y in zip(*_stream(), strict=True):
        hidden = learner.step(x)
        loss = ((readout(hidden) - y) ** 2).mean()
        losses.append(loss.item())
        if opt is not None:
            learner.backward(loss)
            opt.step()
            opt.zero_grad()
    changed = any(
        not torch.equal(a, b) for a, b in zip(before, cell.parameters(), strict=True)
    )
    return sum(losses[-STEPS // 4 :]) / (STEPS // 4), changed


LEARNERS = {
    "rtrl": RTRL,
    "sparse_k4": lambda cell: SparseRTRL(cell, num_paths=4, generator=0),
}
OPTIMIZERS = {"adam": (torch.optim.Adam, 0.01), "sgd": (torch.optim.SGD, 0.1)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_online_learning_beats_frozen(learner, optimizer):
    opt_class, lr = OPTIMIZERS[optimizer]
    frozen, _ = _final_loss(RTRL, opt_class, lr=0.0)
    final, changed = _final_loss(LEARNERS[learner], opt_class, lr)
    assert changed
    assert final <= IMPROVEMENT * frozen
