"""Sparse RTRL: its limits (k = S, k = 0), its selections, and its unbiasedness."""

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from conftest import (
    CELL_FACTORIES,
    make_cell,
    make_readout,
    make_stream,
    online_gradients,
    rel_error,
    state_size,
)
from sparse_rtrl import RTRL, SparseRTRL, adapt, kernels
from sparse_rtrl._native import numba_available


EXACT = 1e-12  # float64; the sparse sum visits the same terms in another order
SETTINGS = list(
    itertools.product(["random", "topk", "adversarial"], [False, True], [1, 3, None])
)


# Every backend: the gathers sum the S terms in another order than the matmul.
BACKENDS = ["auto", "torch", "reference"] + (["numba"] if numba_available() else [])


@pytest.mark.parametrize(("selection", "keep_self", "resample"), SETTINGS)
@pytest.mark.parametrize("kind", ["leaky", "lstm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_paths_equal_exact_rtrl(kind, selection, keep_self, resample, backend):
    with kernels.use_backend(backend):
        _check_all_paths_equal_exact_rtrl(kind, selection, keep_self, resample)


def _check_all_paths_equal_exact_rtrl(kind, selection, keep_self, resample):
    cell = make_cell(kind, seed=5)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=3, steps=12, seed=6)
    exact = RTRL(cell)
    expected = online_gradients(exact, cell, readout, xs, ys)
    sparse = SparseRTRL(
        cell,
        num_paths=state_size(cell),
        selection=selection,
        keep_self=keep_self,
        resample=resample,
        generator=0,
    )
    got = online_gradients(sparse, cell, readout, xs, ys)
    assert rel_error(got, expected) <= EXACT
    assert rel_error([sparse.memory.influence], [exact.memory.influence]) <= EXACT


@pytest.mark.parametrize("kind", sorted(CELL_FACTORIES))
@pytest.mark.parametrize("keep_self", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("column_major", [True, False])
def test_all_paths_are_bitwise_exact_rtrl_in_float32(
    kind, keep_self, rescale, column_major, monkeypatch
):
    """With every path kept the default backend multiplies by J_t itself, in
    the storage order exact RTRL uses (column-major for these small cells; row
    -major past `COLUMN_MAJOR_MAX_STATE`, here lowered), so the float32
    influence and gradients are exact RTRL's bit for bit: a long online run
    through the sparse code follows exact RTRL's trajectory, with no rounding
    difference for the optimizer to amplify."""
    if not column_major:
        monkeypatch.setattr(kernels, "COLUMN_MAJOR_MAX_STATE", 1)
    cell = make_cell(kind, seed=5, dtype=torch.float32)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=15, seed=6, dtype=torch.float32)
    exact = RTRL(cell)
    expected = online_gradients(exact, cell, readout, xs, ys)
    sparse = SparseRTRL(
        cell,
        num_paths=state_size(cell),
        keep_self=keep_self,
        rescale=rescale,
        generator=0,
    )
    with kernels.use_backend("auto"):
        got = online_gradients(sparse, cell, readout, xs, ys)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert torch.equal(sparse.memory.influence, exact.memory.influence)
    for influence in (sparse.memory.influence, exact.memory.influence):
        assert kernels.column_major(influence) == column_major


def _truncated_gradients(cell, readout, xs, ys):
    """Independent one-step truncation: autograd with s_{t-1} detached."""
    state = torch.zeros(xs.shape[1], state_size(cell), dtype=xs.dtype)
    total = 0.0
    for x, y in zip(xs, ys, strict=True):
        state = cell(x, state.detach())
        total = total + ((readout(state) - y) ** 2).sum()
    return list(torch.autograd.grad(total, list(cell.parameters())))


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "leaky"])
def test_zero_paths_is_one_step_truncation(kind):
    cell = make_cell(kind, seed=7)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=8)
    got = online_gradients(SparseRTRL(cell, num_paths=0), cell, readout, xs, ys)
    assert rel_error(got, _truncated_gradients(cell, readout, xs, ys)) <= EXACT


def _snap1_gradients(cell, readout, xs, ys):
    """Independent SnAp-1: dense influence by torch.func, masked to the immediate
    pattern (row i keeps the parameters of unit i) after every step."""
    names = [name for name, _ in cell.named_parameters()]
    params = tuple(p.detach() for p in cell.parameters())
    size = cell.hidden_size
    pattern = torch.cat(
        [
            torch.eye(size, dtype=torch.float64).repeat_interleave(p[0].numel(), dim=1)
            if p.dim() == 2
            else torch.eye(size, dtype=torch.float64)
            for p in params
        ],
        dim=1,
    )  # (S, P): unit i owns row i of every weight and bias

    def step(theta, x, s):
        return functional_call(cell, dict(zip(names, theta, strict=True)), (x, s))

    batch = xs.shape[1]
    state = torch.zeros(batch, size, dtype=torch.float64)
    influence = torch.zeros(batch, size, pattern.shape[1], dtype=torch.float64)
    grads = torch.zeros(pattern.shape[1], dtype=torch.float64)
    for x, y in zip(xs, ys, strict=True):
        for b in range(batch):
            jp, js = jacrev(
                lambda t, s, xb=x[b : b + 1]: step(t, xb, s[None])[0], argnums=(0, 1)
            )(params, state[b])
            immediate = torch.cat([j.reshape(size, -1) for j in jp], dim=1)
            influence[b] = (js @ influence[b] + immediate) * pattern
        state = step(params, x, state).detach()
        hidden = state.clone().requires_grad_(True)
        (credit,) = torch.autograd.grad(((readout(hidden) - y) ** 2).sum(), hidden)
        grads += torch.einsum("bs,bsp->p", credit, influence)
    return adapt(cell).flat_to_params(grads)


def test_zero_paths_keep_self_is_snap1():
    cell = make_cell("rnn_tanh", seed=9)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=8, seed=10)
    learner = SparseRTRL(cell, num_paths=0, keep_self=True)
    got = online_gradients(learner, cell, readout, xs, ys)
    assert rel_error(got, _snap1_gradients(cell, readout, xs, ys)) <= EXACT


def _tie_free_jacobian(batch=2, size=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randperm(batch * size * size, generator=gen).double() + 1.0
    signs = torch.randint(0, 2, (batch * size * size,), generator=gen) * 2 - 1
    return (values * signs).view(batch, size, size) / values.numel()


@pytest.mark.parametrize("keep_self", [False, True])
@pytest.mark.parametrize("selection", ["topk", "adversarial"])
@pytest.mark.parametrize("num_paths", [1, 3, 6])
def test_topk_and_adversarial_keep_the_extreme_entries(selection, keep_self, num_paths):
    cell = make_cell("leaky", hidden_size=7)
    learner = SparseRTRL(
        cell, num_paths=num_paths, selection=selection, keep_self=keep_self
    )
    jacobian = _tie_free_jacobian()
    got = learner.select_paths(jacobian)
    for b, i in itertools.product(range(2), range(7)):
        # Independent construction: sort the row's magnitudes, self excluded if kept.
        candidates = [j for j in range(7) if not (keep_self and j == i)]
        ranked = sorted(
            candidates,
            key=lambda j: abs(float(jacobian[b, i, j])),
            reverse=selection == "topk",
        )
        expected = set(ranked[:num_paths]) | ({i} if keep_self else set())
        assert set(got[b, i].tolist()) == expected
        assert len(got[b, i]) == len(expected)
        if keep_self:
            assert int(got[b, i, 0]) == i


def _masks(learner, steps=7, seed=11):
    xs, _ = make_stream(batch=2, steps=steps, seed=seed)
    masks = []
    for x in xs:
        learner.step(x)
        masks.append(learner.memory.path_index.clone())
    return masks


def test_random_selection_is_seeded():
    cell = make_cell("leaky", hidden_size=8)
    first = _masks(SparseRTRL(cell, num_paths=3, generator=1))
    again = _masks(SparseRTRL(cell, num_paths=3, generator=1))
    other = _masks(SparseRTRL(cell, num_paths=3, generator=2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Uniform without replacement: every row holds distinct indices.
    for mask in first:
        assert (mask.sort(dim=2).values.diff(dim=2) > 0).all()


@pytest.mark.parametrize(
    ("resample", "changes_at"),
    [
        (1, [1, 2, 3, 4, 5, 6]),
        (3, [3, 6]),
        (None, []),
    ],
)
def test_resample_schedule(resample, changes_at):
    cell = make_cell("leaky", hidden_size=8)
    masks = _masks(SparseRTRL(cell, num_paths=2, resample=resample, generator=3))
    changed = [
        t for t in range(1, len(masks)) if not torch.equal(masks[t], masks[t - 1])
    ]
    assert changed == changes_at


def _mean_influence(rescale, draws=4000, steps=6):
    """Mean over `draws` mask sequences (one per stream) and its standard error."""
    torch.manual_seed(0)
    cell = nn.RNNCell(2, 4).double()
    gen = torch.Generator().manual_seed(12)
    xs = torch.randn(steps, 1, 2, generator=gen, dtype=torch.float64)
    exact = RTRL(cell)
    sparse = SparseRTRL(cell, num_paths=2, rescale=rescale, generator=13)
    for x in xs:
        exact.step(x)
        sparse.step(x.expand(draws, 2).contiguous())
    samples = sparse.memory.influence  # (draws, S, P)
    mean = samples.mean(0)
    stderr = samples.std(0) / draws**0.5
    return mean, stderr, exact.memory.influence[0]


def _within(mean, stderr, exact):
    return bool(((mean - exact).abs() <= 4 * stderr + 1e-12).all())


def test_rescaled_random_masks_are_unbiased():
    mean, stderr, exact = _mean_influence(rescale=True)
    assert _within(mean, stderr, exact)
    assert (stderr > 0).any()  # the estimate is random: the test has power


def test_unrescaled_random_masks_are_biased():
    mean, stderr, exact = _mean_influence(rescale=False)
    assert not _within(mean, stderr, exact)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "generic"])
def test_deferred_update_gives_the_same_bits_whether_or_not_it_is_read(kind):
    """`backward` runs the step's update with the gradient in one pass; reading
    `memory.influence` first runs the update alone. Both give the same bits."""

    def trajectory(peek):
        cell = make_cell(kind, 6, seed=4, dtype=torch.float32)
        learner = SparseRTRL(cell, num_paths=2, generator=1)
        readout = make_readout(cell)
        xs, ys = make_stream(batch=2, steps=8, seed=3, dtype=torch.float32)
        out = []
        for x, y in zip(xs, ys, strict=True):
            hidden = learner.step(x)
            if peek:
                learner.memory.influence  # noqa: B018 - runs the update alone
            learner.backward(((readout(hidden) - y) ** 2).sum())
            out += [p.grad.clone() for p in cell.parameters()]
            out.append(learner.memory.influence.clone())
        return out

    for a, b in zip(trajectory(False), trajectory(True), strict=True):
        assert torch.equal(a, b)
