"""The baselines reduce to exact methods in their limits, and they learn.

SnAp against an independent masked-influence computation (Jacobians by
autograd of the module itself), truncated BPTT against BPTT, and the special
cases where two methods coincide. The unbiasedness of UORO and KF-RTRL is in
test_unbiasedness.py; the registry-wide contract in test_estimator_contract.py.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import (
    bptt_gradients,
    make_cell,
    make_readout,
    make_stream,
    online_gradients,
    rel_error,
    state_size,
)
from sparse_rtrl import LeakyRNNCell, adapt, make_estimator
from sparse_rtrl.estimators import (
    ESTIMATORS,
    KFRTRL,
    RFLO,
    RTRL,
    TBPTT,
    SnAp,
    SparseRTRL,
)


# Tolerances (float64), with the reason for each.
EXACT = 1e-10  # same maths, other summation order, T <= 10: rounding ~1e-14
DIFFERENT = 1e-3  # two approximations that must disagree by far more than rounding


# A sparse recurrent network -------------------------------------------------


def sparse_leaky(hidden=6, density=0.3, seed=0, alpha=0.3):
    """A leaky cell with a fixed random connectivity mask (no self-connections)."""
    gen = torch.Generator().manual_seed(seed + 100)
    mask = (torch.rand(hidden, hidden, generator=gen) < density).float()
    mask.fill_diagonal_(0)
    torch.manual_seed(seed)
    return LeakyRNNCell(3, hidden, alpha=alpha, recurrent_mask=mask).double()


def get_cell(kind, seed=0):
    return (
        sparse_leaky(seed=seed)
        if kind == "sparse_leaky"
        else make_cell(kind, seed=seed)
    )


# An independent SnAp-n: dense Jacobians by autograd, pattern by probing -------


def module_step(cell, params, x, state):
    """One step of the module (functional), state as (B, S)."""
    if isinstance(cell, nn.LSTMCell):
        hidden, c = functional_call(cell, params, (x, tuple(state.chunk(2, dim=1))))
        return torch.cat((hidden, c), dim=1)
    return functional_call(cell, params, (x, state))


def step_jacobians(cell, x, state):
    """J (S, S) and the dense immediate Jacobian (S, P) of one stream, by autograd."""
    names = [name for name, _ in cell.named_parameters()]
    values = tuple(p.detach() for p in cell.parameters())

    def by_params(*theta):
        return module_step(cell, dict(zip(names, theta, strict=True)), x, state)[0]

    def by_state(s):
        return module_step(cell, dict(zip(names, values, strict=True)), x, s[None])[0]

    size = state.shape[1]
    parts = torch.autograd.functional.jacobian(by_params, values)
    immediate = torch.cat([part.reshape(size, -1) for part in parts], dim=1)
    return torch.autograd.functional.jacobian(by_state, state[0]), immediate


def snap_mask(cell, order):
    """Pi_n from the Jacobian patterns at random probe points (Menick et al.)."""
    gen = torch.Generator().manual_seed(7)
    size = state_size(cell)
    rec = imm = 0
    for _ in range(3):
        x = torch.randn(1, 3, generator=gen, dtype=torch.float64)
        s = torch.randn(1, size, generator=gen, dtype=torch.float64)
        jac, immediate = step_jacobians(cell, x, s)
        rec, imm = rec + (jac != 0), imm + (immediate != 0)
    pattern = imm > 0
    for _ in range(order - 1):
        pattern = pattern | ((rec.double() @ pattern.double()) > 0)
    return pattern.double()


def independent_snap(cell, order, readout, xs, ys):
    """sum_t c_t M_t with M_t = Pi_n * (J_t M_{t-1} + I_t), per stream."""
    mask, size = snap_mask(cell, order), state_size(cell)
    hidden_size = cell.hidden_size
    total = 0.0
    for b in range(xs.shape[1]):
        state = torch.zeros(1, size, dtype=torch.float64)
        influence = torch.zeros_like(mask)
        for x, y in zip(xs[:, b : b + 1], ys[:, b : b + 1], strict=True):
            jac, immediate = step_jacobians(cell, x, state)
            influence = mask * (jac @ influence + immediate)
            with torch.no_grad():
                state = module_step(cell, dict(cell.named_parameters()), x, state)
            hidden = state[:, :hidden_size].clone().requires_grad_(True)
            loss = ((readout(hidden) - y) ** 2).sum()
            (credit,) = torch.autograd.grad(loss, hidden)
            total = total + credit[0] @ influence[:hidden_size]
    return [
        p.reshape(q.shape)
        for p, q in zip(split(cell, total), cell.parameters(), strict=True)
    ]


def split(cell, flat):
    sizes = [p.numel() for p in cell.parameters()]
    return list(torch.split(flat, sizes))


def run(learner, cell, readout, xs, ys):
    return online_gradients(learner, cell, readout, xs, ys)


# SnAp reductions --------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["rnn_tanh", "leaky", "gru", "lstm", "generic", "sparse_leaky"]
)
def test_snap_saturating_order_equals_rtrl(kind):
    cell = get_cell(kind, seed=1)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=8, seed=3)
    expected = bptt_gradients(cell, readout, xs, ys)
    got = run(SnAp(cell, order=state_size(cell)), cell, readout, xs, ys)
    assert rel_error(got, expected) <= EXACT


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("kind", ["sparse_leaky", "rnn_tanh", "gru", "lstm"])
def test_snap_equals_independent_masked_influence(kind, order):
    cell = get_cell(kind, seed=2)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=6, seed=4)
    expected = independent_snap(cell, order, readout, xs, ys)
    got = run(SnAp(cell, order=order), cell, readout, xs, ys)
    assert rel_error(got, expected) <= EXACT


def test_snap1_and_snap2_differ_on_a_sparse_network():
    cell = sparse_leaky(seed=3)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=5)
    snap1 = run(SnAp(cell, order=1), cell, readout, xs, ys)
    snap2 = run(SnAp(cell, order=2), cell, readout, xs, ys)
    exact = bptt_gradients(cell, readout, xs, ys)
    assert rel_error(snap1, snap2) > DIFFERENT
    assert rel_error(snap2, exact) > DIFFERENT
    # SnAp-2 keeps a strict superset of SnAp-1's entries, and fewer than all.
    mask1, mask2 = (
        SnAp(cell, order=1).influence_mask,
        SnAp(cell, order=2).influence_mask,
    )
    assert bool((mask2 >= mask1).all()) and mask1.sum() < mask2.sum() < mask2.numel()


@pytest.mark.parametrize("kind", ["leaky", "rnn_tanh"])
def test_snap1_with_diagonal_recurrent_weights_equals_rtrl(kind):
    if kind == "leaky":
        torch.manual_seed(4)
        eye = torch.eye(5)
        cell = LeakyRNNCell(3, 5, alpha=0.3, recurrent_mask=eye).double()
    else:
        cell = make_cell("rnn_tanh", seed=4)
        with torch.no_grad():
            cell.weight_hh.copy_(torch.diag(torch.diagonal(cell.weight_hh)))
    readout = make_readout(cell)
    xs, ys = make_stream(batch=3, steps=10, seed=6)
    expected = bptt_gradients(cell, readout, xs, ys)
    assert rel_error(run(SnAp(cell, order=1), cell, readout, xs, ys), expected) <= EXACT


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "leaky", "sparse_leaky"])
def test_sparse_rtrl_self_path_only_equals_snap1(kind):
    cell = get_cell(kind, seed=5)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=3, steps=10, seed=7)
    sparse = SparseRTRL(cell, num_paths=0, keep_self=True, generator=0)
    expected = run(sparse, cell, readout, xs, ys)
    assert rel_error(run(SnAp(cell, order=1), cell, readout, xs, ys), expected) <= EXACT


# Truncated BPTT -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("rnn_tanh", 0), ("leaky", 3), ("gru", 0), ("lstm", 3), ("generic", 0)],
)
def test_tbptt_with_full_window_equals_bptt(kind, extra):
    cell = make_cell(kind, seed=7)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=9, seed=9)
    expected = bptt_gradients(cell, readout, xs, ys)
    got = run(TBPTT(cell, window=9 + extra), cell, readout, xs, ys)
    assert rel_error(got, expected) <= EXACT


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_tbptt_window_one_is_the_immediate_jacobian(kind):
    # M_t = I_t (one-step truncation) is SparseRTRL with no paths.
    cell = make_cell(kind, seed=8)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=8, seed=10)
    expected = run(SparseRTRL(cell, num_paths=0, generator=0), cell, readout, xs, ys)
    got = run(TBPTT(cell, window=1), cell, readout, xs, ys)
    assert rel_error(got, expected) <= EXACT
    assert rel_error(got, bptt_gradients(cell, readout, xs, ys)) > DIFFERENT


def test_tbptt_short_window_equals_truncated_bptt():
    # The gradient at the last step only, through exactly `window` steps.
    cell = make_cell("leaky", seed=9)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=11)
    learner = TBPTT(cell, window=4)
    for x in xs:
        hidden = learner.step(x)
    learner.backward(((readout(hidden) - ys[-1]) ** 2).sum())
    got = [p.grad for p in cell.parameters()]
    with torch.no_grad():
        state = torch.zeros(2, 5, dtype=torch.float64)
        for x in xs[:-4]:
            state = cell(x, state)
    for x in xs[-4:]:
        state = cell(x, state)
    loss = ((readout(state) - ys[-1]) ** 2).sum()
    expected = torch.autograd.grad(loss, list(cell.parameters()))
    assert rel_error(got, expected) <= EXACT


# RFLO --------------------------------------------------------------------------


def test_rflo_equals_snap1_without_self_connections():
    # Without W_hh's diagonal, J_ii = 1 - alpha: SnAp-1's recursion is RFLO's trace.
    cell = sparse_leaky(seed=10)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=12)
    expected = run(SnAp(cell, order=1), cell, readout, xs, ys)
    assert rel_error(run(RFLO(cell), cell, readout, xs, ys), expected) <= EXACT
    dense = make_cell("leaky", seed=10)  # with self-connections they differ
    readout = make_readout(dense)
    got = run(RFLO(dense), dense, readout, xs, ys)
    assert rel_error(got, run(SnAp(dense, order=1), dense, readout, xs, ys)) > 1e-6


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu"])
def test_rflo_on_rnncell_is_the_immediate_jacobian(kind):
    cell = make_cell(kind, seed=11)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=8, seed=13)
    expected = run(TBPTT(cell, window=1), cell, readout, xs, ys)
    assert rel_error(run(RFLO(cell), cell, readout, xs, ys), expected) <= EXACT


# Building blocks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["rnn_tanh", "leaky", "gru", "lstm", "generic", "sparse_leaky"]
)
def test_immediate_vjp_equals_dense_product(kind):
    cell = get_cell(kind, seed=12)
    adapter = adapt(cell)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    state = torch.randn(3, adapter.state_size, generator=gen, dtype=torch.float64)
    vector = torch.randn(3, adapter.state_size, generator=gen, dtype=torch.float64)
    immediate = adapter.step(x, state).immediate
    expected = torch.einsum("bs,bsp->bp", vector, adapter.dense_immediate(immediate))
    got = adapter.immediate_vjp(immediate, vector)
    assert (got - expected).abs().max() <= 1e-13 * expected.abs().max()


# Learning --------------------------------------------------------------------------


LEARNING_STEPS = 200
LEARNING_OPTIONS = {
    "sparse_rtrl": {"num_paths": 2},
    "tbptt": {"window": 4},
    "snap": {"order": 1},
}


def learning_run(name):
    """Online delay-1 recall with a frozen readout; returns (late loss, changed)."""
    torch.manual_seed(0)
    cell = LeakyRNNCell(1, 8, alpha=0.5).double()
    readout = nn.Linear(8, 1).double().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(LEARNING_STEPS + 1, 1, 1, generator=gen, dtype=torch.float64)
    before = copy.deepcopy(cell.state_dict())
    if name is None:  # the frozen reference
        learner = make_estimator("readout_only", cell)
    else:
        learner = build(name, cell, LEARNING_OPTIONS.get(name, {}))
    opt = torch.optim.Adam(cell.parameters(), lr=0.02)
    losses = []
    for t in range(1, LEARNING_STEPS + 1):
        loss = ((readout(learner.step(xs[t])) - xs[t - 1]) ** 2).mean()
        learner.backward(loss)
        if name is not None:
            opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    changed = any(not torch.equal(before[k], v) for k, v in cell.state_dict().items())
    return sum(losses[LEARNING_STEPS // 2 :]) / (LEARNING_STEPS // 2), changed


def build(name, cell, options):
    options = dict(options)
    if name in ("sparse_rtrl", "uoro", "kf_rtrl"):
        options["generator"] = 0
    return make_estimator(name, cell, **options)


@pytest.fixture(scope="module")
def frozen_loss():
    return learning_run(None)[0]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_each_estimator_learns_with_the_readout_frozen(name, frozen_loss):
    loss, changed = learning_run(name)
    if name == "readout_only":
        assert not changed and loss == pytest.approx(frozen_loss, rel=1e-12)
        return
    assert changed
    assert loss < 0.9 * frozen_loss, f"{name}: {loss:.4f} vs frozen {frozen_loss:.4f}"


# Errors ------------------------------------------------------------------------------


def test_option_errors_name_the_argument():
    cell = make_cell("leaky")
    with pytest.raises(ValueError, match=r"SnAp: `order` must be >= 1 .* got 0"):
        SnAp(cell, order=0)
    with pytest.raises(TypeError, match=r"SnAp: `order` must be an int"):
        SnAp(cell, order=1.5)
    with pytest.raises(ValueError, match=r"TBPTT: `window` must be >= 1 .* got 0"):
        TBPTT(cell, window=0)
    with pytest.raises(TypeError, match=r"UORO: `generator` must be"):
        make_estimator("uoro", cell, generator="seed")
    with pytest.raises(ValueError, match=r"KFRTRL: `epsilon` must be a float > 0"):
        KFRTRL(cell, epsilon=0.0)


@pytest.mark.parametrize(("cls", "kind"), [(KFRTRL, "gru"), (RFLO, "lstm")])
def test_rnn_only_estimators_name_the_supported_cells(cls, kind):
    cell = make_cell(kind)
    with pytest.raises(
        NotImplementedError, match=r"supports RNNCell, LeakyRNNCell; got .*Cell"
    ):
        cls(cell)


@pytest.mark.xfail(
    strict=True,
    raises=NotImplementedError,
    reason="KF-RTRL is derived for vanilla and leaky RNNs only (one Kronecker "
    "product per step); gated cells need one factor pair per gate.",
)
def test_kf_rtrl_supports_gated_cells():
    KFRTRL(make_cell("gru"))


def test_snap1_compact_memory_is_linear_in_parameters():
    # SnAp-1 on an Elman cell stores O(B P) floats, not O(B S P) as RTRL does.
    cell = LeakyRNNCell(3, 32)
    snap, exact = SnAp(cell, order=1), RTRL(cell)
    x = torch.zeros(2, 3)
    snap.step(x), exact.step(x)
    num_params = sum(p.numel() for p in cell.parameters())
    assert snap.memory_floats == 2 * num_params + 2 * 32
    assert exact.memory_floats == 2 * 2 * 32 * num_params + 2 * 32
