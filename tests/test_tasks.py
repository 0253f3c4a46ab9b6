"""Task streams: deterministic from a seed, and the shift raises the loss."""

import numpy as np
import pytest
import torch

from sparse_rtrl.experiments.protocol import FrozenLearner, build_cell
from sparse_rtrl.experiments.tasks import TASKS, lorenz_rk4, make_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_stream_is_deterministic_from_its_seed(name):
    task = make_task(name)
    one = task.sample("B", 60, np.random.default_rng(7))
    two = task.sample("B", 60, np.random.default_rng(7))
    other = task.sample("B", 60, np.random.default_rng(8))
    assert np.array_equal(one.inputs, two.inputs)
    assert np.array_equal(one.targets, two.targets)
    assert not np.array_equal(one.inputs, other.inputs)


def _hidden_states(cell, inputs):
    learner = FrozenLearner(cell)
    x = torch.as_tensor(inputs[0], dtype=torch.float64)
    return torch.cat([learner.step(x[t : t + 1]) for t in range(len(x))]).numpy()


def _features(task, cell, variant, seed):
    stream = task.sample(variant, 400, np.random.default_rng(seed))
    states = _hidden_states(cell, stream.inputs)[50:]
    targets = stream.targets[0, 50:]
    keep = stream.segment_end[50:] if stream.evaluate_at_segment_end else None
    if keep is not None:
        states, targets = states[keep], targets[keep]
    return np.c_[states, np.ones(len(states))], targets


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shift_raises_the_loss_of_a_network_fitted_on_task_a(name):
    """A readout fitted on task A (ridge regression on the cell's states) has a
    clearly larger loss on task B than on fresh task-A data."""
    task = make_task(name)
    torch.manual_seed(0)
    cell = build_cell(
        {"kind": "LeakyRNNCell", "hidden_size": 32, "alpha": 0.2}, task.input_size
    ).double()
    feats, targets = _features(task, cell, "A", 0)
    ridge = 1e-3 * np.eye(feats.shape[1])
    weights = np.linalg.solve(feats.T @ feats + ridge, feats.T @ targets)

    def loss(variant, seed):
        f, y = _features(task, cell, variant, seed)
        return float(((f @ weights - y) ** 2).mean())

    assert loss("B", 2) > 1.2 * loss("A", 1)


def test_adding_targets_are_the_weighted_sum_of_the_marked_values():
    task = make_task("adding", segment_length=6, weights_b=(2.0, -1.0))
    stream = task.sample("B", 24, np.random.default_rng(3))
    values, marks = stream.inputs[0, :, 0], stream.inputs[0, :, 1]
    for end in np.flatnonzero(stream.segment_end):
        seg = slice(end - 5, end + 1)
        first, second = values[seg][marks[seg] == 1]
        assert stream.targets[0, end, 0] == pytest.approx(2 * first - second)


def test_lorenz_rk4_matches_a_fine_reference_and_stays_chaotic():
    start = np.array([[1.0, 1.0, 20.0]])
    coarse = lorenz_rk4(start, 20, 0.01, 28.0)[:, -1]
    fine = lorenz_rk4(start, 200, 0.001, 28.0)[:, -1]
    finer = lorenz_rk4(start, 400, 0.0005, 28.0)[:, -1]
    # RK4 is fourth order: halving dt cuts the error about 16-fold.
    assert np.abs(coarse - finer).max() < 1e-4
    assert np.abs(fine - finer).max() < np.abs(coarse - finer).max() / 100
    near = lorenz_rk4(start + 1e-8, 3000, 0.01, 28.0)[:, -1]
    far = lorenz_rk4(start, 3000, 0.01, 28.0)[:, -1]
    assert np.abs(near - far).max() > 1e-3  # sensitive dependence


def test_bad_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="'A' or 'B'"):
        make_task("sine").sample("C", 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="adding"):
        make_task("nope")
