"""UORO and KF-RTRL are unbiased; the same check catches a biased variant.

DRAWS identical streams run in one batch, each drawing its own random signs,
so each stream's memory holds one independent draw of the estimator. After
STEPS steps, the per-stream gradient estimate for a fixed credit vector,
c M~_T, is compared with exact RTRL's c M_T in every coordinate: the mean
must lie within Z standard errors (+ 1e-12) of it and the variance must be
above zero. A deliberately biased variant must fail the same check (power).
"""

import pytest
import torch

from conftest import make_cell, make_stream
from sparse_rtrl import LeakyRNNCell
from sparse_rtrl.estimators import KFRTRL, RTRL, UORO


DRAWS = 2000  # independent noise draws (the minimum)
STEPS = 5  # long enough for several products of Jacobians, short enough
# that UORO's variance stays moderate
Z = 4.0  # standard errors allowed (max over ~40 coordinates of a fair test ~3)
FLOOR = 1e-12  # float64 rounding of the exact reference


def get_cell(kind):
    if kind != "sparse_leaky":
        return make_cell(kind, hidden_size=4, seed=1)
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(4, 4, generator=gen) < 0.5).float()
    torch.manual_seed(1)
    return LeakyRNNCell(3, 4, alpha=0.3, recurrent_mask=mask).double()


def exact_and_inputs(cell):
    """Exact c M_T (P,) for one stream, the inputs (T, DRAWS, I), and c (S,)."""
    xs, _ = make_stream(batch=1, steps=STEPS, seed=2)
    exact = RTRL(cell)
    for x in xs:
        exact.step(x)
    size = exact.adapter.state_size
    credit = torch.randn(size, generator=torch.Generator().manual_seed(3)).double()
    expected = credit @ exact.memory.influence[0]
    return expected, xs.expand(STEPS, DRAWS, xs.shape[2]), credit


def uoro_samples(learner, credit):
    """(c . s~_b) theta~_b per stream, Eq. (4) of UORO, (DRAWS, P)."""
    memory = learner.memory
    return (memory.state_factor @ credit).unsqueeze(1) * memory.param_factor


def kf_samples(learner, credit):
    """(c^T A_b) (x) u_b per stream, Eq. (4) of KF-RTRL, (DRAWS, P)."""
    memory = learner.memory
    rows = torch.einsum(
        "i,bij,bk->bjk", credit, memory.hidden_factor, memory.input_factor
    )
    mask = learner.adapter.hidden_weight_mask()
    if mask is not None:
        size_in = learner.cell.weight_ih.shape[1]
        rows[:, :, size_in : size_in + mask.shape[1]] *= mask
    return learner.adapter.gate_rows_to_flat(rows)


ESTIMATORS = {"uoro": (UORO, uoro_samples), "kf_rtrl": (KFRTRL, kf_samples)}


def draw(name, kind, signs=None):
    """(samples (DRAWS, P), exact (P,)) after STEPS steps; `signs` swaps the noise."""
    cell = get_cell(kind)
    cls, samples = ESTIMATORS[name]
    expected, xs, credit = exact_and_inputs(cell)
    learner = cls(cell, generator=11)
    if signs is not None:
        learner._draw_signs = signs
    with torch.no_grad():
        for x in xs:
            learner.step(x)
    return samples(learner, credit), expected


def unbiased(samples, expected):
    """Mean within Z standard errors (+ FLOOR) of the exact value, everywhere."""
    mean = samples.mean(0)
    standard_error = samples.std(0) / DRAWS**0.5
    return bool(((mean - expected).abs() <= Z * standard_error + FLOOR).all())


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("uoro", "leaky"),
        ("uoro", "lstm"),
        ("uoro", "sparse_leaky"),
        ("kf_rtrl", "leaky"),
        ("kf_rtrl", "rnn_tanh"),
        ("kf_rtrl", "sparse_leaky"),
    ],
)
def test_mean_gradient_is_exact(name, kind):
    samples, expected = draw(name, kind)
    assert unbiased(samples, expected)
    # Not trivially: every coordinate that can move does vary across draws.
    assert bool((samples.var(0)[expected != 0] > 0).all())
    assert float(samples.var(0).sum()) > 0


def no_signs(shape):
    """The biased variant of the issue: every random sign replaced by +1."""
    return torch.ones(shape, dtype=torch.float64)


def skewed_signs(shape, _gen=torch.Generator().manual_seed(0)):  # noqa: B008
    """Random signs with P(+1) = 0.9: E[nu nu^T] != I, still random."""
    return torch.where(torch.rand(shape, generator=_gen) < 0.9, 1.0, -1.0).double()


@pytest.mark.parametrize("signs", [no_signs, skewed_signs])
@pytest.mark.parametrize("name", ["uoro", "kf_rtrl"])
def test_the_check_detects_a_biased_variant(name, signs):
    samples, expected = draw(name, "leaky", signs=signs)
    if signs is skewed_signs:
        assert float(samples.var(0).sum()) > 0  # random, so the mean check fails
    assert not unbiased(samples, expected)
