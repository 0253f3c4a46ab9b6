"""Property-based checks of the core invariants over cells, sizes, k and dtypes."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    bptt_gradients,
    make_cell,
    make_readout,
    make_stream,
    online_gradients,
    rel_error,
    state_size,
)
from sparse_rtrl import RTRL, SparseRTRL


KINDS = ["rnn_tanh", "rnn_relu", "gru", "lstm", "leaky", "generic"]
PROFILE = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROFILE
@given(
    kind=st.sampled_from(KINDS),
    hidden=st.integers(1, 6),
    batch=st.integers(1, 3),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_exact_rtrl_equals_bptt(kind, hidden, batch, steps, seed):
    cell = make_cell(kind, hidden_size=hidden, seed=seed)
    readout = make_readout(cell, seed=seed + 1)
    xs, ys = make_stream(batch=batch, steps=steps, seed=seed + 2)
    got = online_gradients(RTRL(cell), cell, readout, xs, ys)
    assert rel_error(got, bptt_gradients(cell, readout, xs, ys)) <= 1e-9


@PROFILE
@given(
    kind=st.sampled_from(KINDS[:5]),
    hidden=st.integers(1, 6),
    selection=st.sampled_from(["random", "topk", "adversarial"]),
    keep_self=st.booleans(),
    resample=st.sampled_from([1, 2, None]),
    seed=st.integers(0, 2**16),
)
def test_all_paths_equal_exact(kind, hidden, selection, keep_self, resample, seed):
    cell = make_cell(kind, hidden_size=hidden, seed=seed)
    readout = make_readout(cell, seed=seed + 1)
    xs, ys = make_stream(batch=2, steps=6, seed=seed + 2)
    expected = online_gradients(RTRL(cell), cell, readout, xs, ys)
    sparse = SparseRTRL(
        cell,
        num_paths=state_size(cell),
        selection=selection,
        keep_self=keep_self,
        resample=resample,
        generator=seed,
    )
    assert rel_error(online_gradients(sparse, cell, readout, xs, ys), expected) <= 1e-12


@PROFILE
@given(
    kind=st.sampled_from(KINDS[:5]),
    hidden=st.integers(2, 8),
    paths=st.integers(0, 8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_sparse_influence_stays_finite(kind, hidden, paths, dtype, seed):
    cell = make_cell(kind, hidden_size=hidden, seed=seed, dtype=dtype)
    learner = SparseRTRL(
        cell, num_paths=min(paths, state_size(cell)), rescale=True, generator=seed
    )
    xs, _ = make_stream(batch=2, steps=20, seed=seed + 2, dtype=dtype)
    for x in xs:
        hidden_state = learner.step(x)
        assert hidden_state.dtype == dtype
    assert bool(torch.isfinite(learner.memory.influence).all())
