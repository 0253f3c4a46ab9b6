"""Bad input to the core gets a clear error naming the argument, value and way out."""

import pytest
import torch

from conftest import INPUT_SIZE, make_cell
from sparse_rtrl import RTRL, SparseRTRL, make_estimator


@pytest.fixture
def cell():
    return make_cell("leaky", hidden_size=5)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"num_paths": -1},
            ValueError,
            r"`num_paths` must be in \[0, state_size=5\], got -1",
        ),
        (
            {"num_paths": 6},
            ValueError,
            r"`num_paths` must be in \[0, state_size=5\], got 6",
        ),
        ({"num_paths": 2.5}, TypeError, r"`num_paths` must be an int, got 2.5"),
        (
            {"selection": "best"},
            ValueError,
            r"unknown `selection` 'best'; expected one of "
            r"random, topk, adversarial",
        ),
        ({"resample": 0}, ValueError, r"`resample` must be a positive int .* got 0"),
        (
            {"rescale": True, "selection": "topk"},
            ValueError,
            r"`rescale=True` applies to",
        ),
        ({"generator": "seed"}, TypeError, r"`generator` must be a torch.Generator"),
    ],
)
def test_bad_sparse_options(cell, options, error, match):
    with pytest.raises(error, match=match):
        SparseRTRL(cell, **options)


def test_unknown_estimator(cell):
    with pytest.raises(
        ValueError, match=r"Unknown estimator 'uoro2'; available: .*rtrl"
    ):
        make_estimator("uoro2", cell)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"`cell` must be a torch.nn.Module"):
        RTRL("RNNCell")


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (
            torch.zeros(2, INPUT_SIZE + 1, dtype=torch.float64),
            ValueError,
            r"`x` must have shape \(B, input_size=3\), got \(2, 4\)",
        ),
        (
            torch.zeros(INPUT_SIZE, dtype=torch.float64),
            ValueError,
            r"got \(3,\)\. For a single stream, use x.unsqueeze\(0\)",
        ),
        (
            torch.zeros(2, INPUT_SIZE, dtype=torch.float32),
            TypeError,
            r"`x` has dtype torch.float32 but the cell's parameters are torch.float64",
        ),
        (
            torch.zeros(2, INPUT_SIZE, dtype=torch.float64, device="meta"),
            ValueError,
            r"`x` is on meta but the cell is on cpu",
        ),
        (
            torch.full((2, INPUT_SIZE), float("nan"), dtype=torch.float64),
            ValueError,
            r"`x` holds non-finite values \(NaN or inf\) at step 0",
        ),
        ([[0.0, 0.0, 0.0]], TypeError, r"`x` must be a torch.Tensor, got list"),
    ],
)
def test_bad_input(cell, x, error, match):
    with pytest.raises(error, match=match):
        SparseRTRL(cell).step(x)


@pytest.mark.parametrize("batch", [1, 40])  # checked as Python floats, by numpy
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_input_value_is_caught(cell, batch, bad):
    x = torch.zeros(batch, INPUT_SIZE, dtype=torch.float64)
    x[-1, -1] = bad
    with pytest.raises(ValueError, match=r"`x` holds non-finite values"):
        RTRL(cell).step(x)


def test_batch_size_change_needs_reset(cell):
    learner = RTRL(cell)
    learner.step(torch.zeros(2, INPUT_SIZE, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"batch size 3 but the learner runs 2 streams"
    ):
        learner.step(torch.zeros(3, INPUT_SIZE, dtype=torch.float64))
    learner.reset()
    learner.step(torch.zeros(3, INPUT_SIZE, dtype=torch.float64))


def test_backward_before_step(cell):
    learner = RTRL(cell)
    with pytest.raises(RuntimeError, match=r"RTRL.backward was called before any step"):
        learner.backward(torch.tensor(0.0))


def test_replaced_parameters_are_detected(cell):
    learner = RTRL(cell)
    cell.weight_hh = torch.nn.Parameter(cell.weight_hh.detach().clone())
    with pytest.raises(RuntimeError, match=r"parameters were replaced"):
        learner.step(torch.zeros(1, INPUT_SIZE, dtype=torch.float64))
