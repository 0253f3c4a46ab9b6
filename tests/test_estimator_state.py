"""reset, state_dict and load_state_dict of the core estimators."""

import torch

from conftest import make_cell, make_readout, make_stream
from sparse_rtrl import RTRL, SparseRTRL


def _run(learner, readout, xs, ys):
    outputs = []
    for x, y in zip(xs, ys, strict=True):
        hidden = learner.step(x)
        learner.backward(((readout(hidden) - y) ** 2).sum())
        outputs.append(hidden.detach().clone())
    return outputs


def test_sparse_state_dict_resumes_bitwise():
    cell = make_cell("gru", seed=1)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=2)
    whole = SparseRTRL(cell, num_paths=2, generator=5)
    _run(whole, readout, xs[:6], ys[:6])
    saved = whole.state_dict()
    tail = _run(whole, readout, xs[6:], ys[6:])

    resumed = SparseRTRL(cell, num_paths=2, generator=99)  # another seed: restored
    resumed.load_state_dict(saved)
    again = _run(resumed, readout, xs[6:], ys[6:])
    assert all(torch.equal(a, b) for a, b in zip(tail, again, strict=True))
    assert torch.equal(whole.memory.influence, resumed.memory.influence)
    assert torch.equal(whole.memory.path_index, resumed.memory.path_index)


def test_reset_clears_state_influence_and_count():
    cell = make_cell("lstm", seed=3)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=5, seed=4)
    learner = RTRL(cell)
    first = _run(learner, readout, xs, ys)
    learner.reset()
    assert learner.memory.state is None and learner.memory.step_count == 0
    assert learner.hidden is None
    second = _run(learner, readout, xs, ys)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
