"""Exact RTRL equals BPTT (autograd through the unrolled sequence) in float64."""

import pytest

from conftest import (
    bptt_gradients,
    make_cell,
    make_readout,
    make_stream,
    online_gradients,
    rel_error,
)
from sparse_rtrl import RTRL, kernels


TOLERANCE = 1e-9  # float64, T = 25: accumulated rounding stays near 1e-13


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("column_major", [True, False])
def test_rtrl_equals_bptt(cell_kind, bias, seed, column_major, monkeypatch):
    """In both storage orders of the influence (small cells are column-major;
    lowering the threshold makes them row-major, as cells past it are)."""
    if not column_major:
        monkeypatch.setattr(kernels, "COLUMN_MAJOR_MAX_STATE", 1)
    cell = make_cell(cell_kind, bias=bias, seed=seed)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=3, steps=25, seed=seed + 10)
    expected = bptt_gradients(cell, readout, xs, ys)
    learner = RTRL(cell)
    got = online_gradients(learner, cell, readout, xs, ys)
    assert rel_error(got, expected) <= TOLERANCE
    assert kernels.column_major(learner.memory.influence) == column_major
