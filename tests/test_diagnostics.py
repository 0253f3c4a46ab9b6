"""Diagnostics: spectra vs numpy, gradient alignment, float32 drift, no side effects."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import make_cell, make_readout, make_stream
from sparse_rtrl import RTRL, LeakyRNNCell, SparseRTRL
from sparse_rtrl.diagnostics import (
    GradientComparison,
    TrajectoryRecorder,
    condition_number,
    effective_rank,
    isotropy,
    relative_frobenius,
    spectrum,
    trajectory_spectra,
)


# Tolerances, with the reason for each.
SPECTRUM_TOL = 1e-12  # float64 SVD of small matrices vs numpy's LAPACK call
COSINE_TOL = 1e-12  # acceptance: k = S sparse RTRL vs exact, float64
# Absolute, on drift values of ~1e-7: the two float64 references (shadow RTRL,
# autograd) differ by rounding, ~1e-16 of ||M||, which enters the drift additively.
DRIFT_TOL = 1e-13


def _numpy_effective_rank(matrix: np.ndarray) -> float:
    values = np.linalg.svd(matrix, compute_uv=False)
    return float((values**2).sum() ** 2 / (values**4).sum())


# 1. Matrix spectra against numpy ---------------------------------------------


def test_identity_is_perfectly_isotropic():
    found = spectrum(torch.eye(7, dtype=torch.float64))
    assert float(found.condition_number) == 1.0
    assert float(found.effective_rank) == pytest.approx(7.0, abs=SPECTRUM_TOL)
    assert float(found.isotropy) == pytest.approx(1.0, abs=SPECTRUM_TOL)
    assert int(found.rank) == 7 and not bool(found.rank_deficient)


def test_diagonal_matrix_matches_numpy_and_closed_form():
    diag = np.array([3.0, -0.5, 2.0, 1.0])
    matrix = torch.from_numpy(np.diag(diag))
    # Closed form: cond = 3 / 0.5; r_eff = (9 + .25 + 4 + 1)^2 / (81 + .0625 + 16 + 1).
    assert float(condition_number(matrix)) == pytest.approx(6.0, rel=SPECTRUM_TOL)
    assert float(condition_number(matrix)) == pytest.approx(
        np.linalg.cond(np.diag(diag)), rel=SPECTRUM_TOL
    )
    expected_rank = 14.25**2 / 98.0625
    assert float(effective_rank(matrix)) == pytest.approx(expected_rank, rel=1e-12)
    assert float(isotropy(matrix)) == pytest.approx(expected_rank / 4, rel=1e-12)


def test_random_batch_matches_numpy():
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, 6, 6))
    found = spectrum(torch.from_numpy(batch))
    for b in range(3):
        assert float(found.condition_number[b]) == pytest.approx(
            np.linalg.cond(batch[b]), rel=1e-10
        )
        assert float(found.effective_rank[b]) == pytest.approx(
            _numpy_effective_rank(batch[b]), rel=SPECTRUM_TOL
        )
        np.testing.assert_allclose(
            found.singular_values[b].numpy(),
            np.linalg.svd(batch[b], compute_uv=False),
            rtol=1e-12,
        )


def test_rank_deficient_matrix_is_reported_as_such():
    # Rows 3 = row 1 + row 2: rank 2 of 3. numpy's cond gives a huge finite ratio
    # of rounding errors; the diagnostics say rank-deficient and infinite.
    matrix = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0], [1.5, 1.0, 7.0]])
    found = spectrum(torch.from_numpy(matrix))
    assert int(found.rank) == np.linalg.matrix_rank(matrix) == 2
    assert bool(found.rank_deficient)
    assert math.isinf(float(found.condition_number))
    assert np.linalg.cond(matrix) > 1e14  # numpy: finite but meaningless
    assert float(found.effective_rank) == pytest.approx(
        _numpy_effective_rank(matrix), rel=1e-10
    )


def test_exactly_singular_and_zero_matrices_have_infinite_condition():
    singular = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    assert math.isinf(float(condition_number(singular)))
    assert float(effective_rank(singular)) == pytest.approx(25 / 17, rel=1e-12)
    zero = spectrum(torch.zeros(3, 3, dtype=torch.float64))
    assert math.isinf(float(zero.condition_number))
    assert float(zero.effective_rank) == 0.0 and int(zero.rank) == 0


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="`matrix`"):
        spectrum(torch.ones(3))
    with pytest.raises(TypeError, match="floating point"):
        spectrum(torch.ones(2, 2, dtype=torch.int64))


# 2. Gradient alignment and drift on one trajectory ----------------------------


def _loss_fn(readout, y):
    return lambda hidden: ((readout(hidden) - y) ** 2).sum()


@pytest.mark.parametrize("kind", ["leaky", "lstm"])
def test_full_sparse_rtrl_is_aligned_with_exact(kind):
    cell = make_cell(kind, hidden_size=4, seed=3)
    readout = make_readout(cell)
    size = 8 if kind == "lstm" else 4
    approx = {
        "full": SparseRTRL(cell, num_paths=size, generator=0),
        "k1": SparseRTRL(cell, num_paths=1, generator=0),
    }
    comparison = GradientComparison(cell, approx)
    xs, ys = make_stream(batch=2, steps=12, seed=4)
    for x, y in zip(xs, ys, strict=True):
        comparison.step(x, _loss_fn(readout, y))
    history = comparison.history()
    full = history["full"]
    assert (full["cosine"] - 1).abs().max() <= COSINE_TOL
    assert (full["cum_cosine"] - 1).abs().max() <= COSINE_TOL
    assert full["rel_error"].max() <= 1e-12
    # k = 1 drops paths: the comparison must see a difference after step 1.
    assert history["k1"]["rel_error"][2:].min() > 1e-6
    assert history["k1"]["cosine"][2:].max() < 1 - 1e-9


def test_cumulative_exact_gradient_is_bptt():
    # The accumulated reference gradient (fixed cell) is BPTT's, so the
    # comparison's cum_* metrics refer to the true gradient of the summed loss.
    from conftest import bptt_gradients

    cell = make_cell("leaky", hidden_size=4, seed=5)
    readout = make_readout(cell)
    xs, ys = make_stream(batch=2, steps=10, seed=6)
    comparison = GradientComparison(cell, {})
    for x, y in zip(xs, ys, strict=True):
        comparison.step(x, _loss_fn(readout, y))
    expected = torch.cat([g.reshape(-1) for g in bptt_gradients(cell, readout, xs, ys)])
    got = comparison.totals["reference"]
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-10
    assert all(p.grad is None for p in cell.parameters())  # no .grad left behind


@pytest.mark.parametrize("kind", ["leaky", "lstm"])
def test_float64_shadow_of_float64_learner_has_zero_drift(kind):
    for learner_of in (
        lambda c: RTRL(c),
        lambda c: SparseRTRL(c, num_paths=2, generator=1, rescale=True),
        lambda c: SparseRTRL(c, num_paths=4, generator=1),  # k >= S/2: "dense"
    ):
        cell = make_cell(kind, hidden_size=5, seed=7)
        recorder = TrajectoryRecorder(learner_of(cell), drift=True)
        xs, _ = make_stream(batch=2, steps=8, seed=8)
        for x in xs:
            recorder.step(x)
        assert torch.equal(recorder.history()["drift"], torch.zeros(8, 2))


def _independent_influence(cell, xs) -> list[torch.Tensor]:
    """d s_t / d theta by autograd through the unrolled float64 run, (B, S, P)."""
    names = [name for name, _ in cell.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in cell.parameters()])
    shapes = [p.shape for p in cell.parameters()]

    def states(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        state = torch.zeros(xs.shape[1], cell.hidden_size, dtype=flat.dtype)
        out = []
        for x in xs:
            state = torch.func.functional_call(cell, params, (x, state))
            out.append(state)
        return torch.stack(out)  # (T, B, S)

    jac = torch.autograd.functional.jacobian(states, flat0)  # (T, B, S, P)
    return list(jac)


def test_float32_drift_is_positive_and_matches_independent_computation():
    cell32 = make_cell("leaky", hidden_size=4, seed=9, dtype=torch.float32)
    xs, _ = make_stream(batch=2, steps=15, seed=10, dtype=torch.float32)
    learner = RTRL(cell32)
    recorder = TrajectoryRecorder(learner, drift=True)
    cell64 = copy.deepcopy(cell32).double()
    exact64 = _independent_influence(cell64, xs.double())
    expected = []
    for t, x in enumerate(xs):
        recorder.step(x)
        influence32 = learner.memory.influence.double()
        num = (influence32 - exact64[t]).flatten(1).norm(dim=1)
        expected.append(num / exact64[t].flatten(1).norm(dim=1))
    drift = recorder.history()["drift"]
    assert drift.dtype == torch.float64
    assert bool((drift > 0).all())
    torch.testing.assert_close(drift, torch.stack(expected), rtol=0, atol=DRIFT_TOL)


def test_relative_frobenius_per_stream():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    est = torch.tensor([[3.0, 5.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = relative_frobenius(est, ref)
    assert got.tolist() == [0.2, 0.0, math.inf]


def test_recorded_jacobian_is_the_cells():
    cell = make_cell("rnn_tanh", hidden_size=4, seed=11)
    recorder = TrajectoryRecorder(RTRL(cell), influence_every=2)
    xs, _ = make_stream(batch=1, steps=5, seed=12)
    state = torch.zeros(1, 4, dtype=torch.float64)
    conds = []
    for x in xs:
        jac = torch.autograd.functional.jacobian(lambda s, x=x: cell(x, s), state)
        conds.append(np.linalg.cond(jac[0, :, 0].numpy()))
        recorder.step(x)
        state = cell(x, state).detach()
    history = recorder.history()
    np.testing.assert_allclose(history["jacobian_condition"][:, 0], conds, rtol=1e-9)
    along = trajectory_spectra(cell, xs)  # the same trajectory, no learner
    assert torch.equal(along.condition_number, history["jacobian_condition"])
    assert history["influence_steps"].tolist() == [0, 2, 4]
    assert history["influence_singular_values"].shape == (3, 1, 4)


# 3. Recording changes nothing ---------------------------------------------------


def _online_run(cell, learner_of, xs, ys, *, record: bool):
    cell = copy.deepcopy(cell)
    readout = make_readout(cell, seed=13)
    learner = learner_of(cell)
    stepper = (
        TrajectoryRecorder(learner, influence_every=3, drift=True)
        if record
        else learner
    )
    opt = torch.optim.Adam([*cell.parameters(), *readout.parameters()], lr=1e-2)
    outputs = []
    for x, y in zip(xs, ys, strict=True):
        hidden = stepper.step(x)
        learner.backward(((readout(hidden) - y) ** 2).sum())
        opt.step()
        opt.zero_grad()
        outputs.append(hidden.detach().clone())
    params = [p.detach().clone() for p in cell.parameters()]
    return (
        outputs,
        params,
        learner.memory.influence.clone(),
        learner.generator.get_state() if hasattr(learner, "generator") else None,
    )


@pytest.mark.parametrize(
    "learner_of",
    [
        lambda c: RTRL(c),
        lambda c: SparseRTRL(c, num_paths=2, generator=4),
        lambda c: SparseRTRL(c, num_paths=1, keep_self=True, resample=3, generator=5),
    ],
    ids=["rtrl", "sparse_random", "sparse_keep_self"],
)
def test_recording_does_not_change_the_learner(learner_of):
    cell = LeakyRNNCell(3, 6, alpha=0.3).float()
    xs, ys = make_stream(batch=2, steps=10, seed=14, dtype=torch.float32)
    plain = _online_run(cell, learner_of, xs, ys, record=False)
    recorded = _online_run(cell, learner_of, xs, ys, record=True)
    for a, b in zip(
        plain[0] + plain[1] + [plain[2]],
        recorded[0] + recorded[1] + [recorded[2]],
        strict=True,
    ):
        assert torch.equal(a, b)
    if plain[3] is not None:
        assert torch.equal(plain[3], recorded[3])


# 4. The analyze experiment: CLI smoke test, the C5 row --------------------------


TINY_CONFIG = {
    "kind": "analyze",
    "pretrain": {"steps": 0},
    "warmup_steps": 4,
    "spectra": {
        "task": "sine",
        "hidden_sizes": [3, 5],
        "cells": [{"kind": "LeakyRNNCell", "alpha": 0.2}, {"kind": "RNNCell"}],
        "steps": 6,
    },
    "alignment": {
        "task": "sine",
        "hidden_size": 3,
        "steps": 5,
        "num_paths": [0, 1, 3],
        "policy_paths": 1,
    },
    "drift": {
        "tasks": ["sine", "lorenz"],
        "hidden_size": 3,
        "steps": 12,
        "segment_length": 4,
        "curve_points": 6,
        "methods": [
            {"label": "rtrl", "name": "rtrl", "options": {}},
            {"label": "sparse k=1", "name": "sparse_rtrl", "options": {"num_paths": 1}},
        ],
    },
}


def test_cli_writes_summary_figures_and_a_measured_c5_row(tmp_path):
    from sparse_rtrl.cli import main
    from sparse_rtrl.experiments.analyze import FIGURES
    from sparse_rtrl.experiments.studies import STUDIES
    from sparse_rtrl.experiments.sweep import RunSpec

    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "out"
    assert main(["analyze", str(config_path), "--out", str(out), "--no-progress"]) == 0

    for name in FIGURES:
        assert (out / name).stat().st_size > 1000
    saved = json.loads((out / "analyze.json").read_text())
    (summary,) = saved["runs"]
    assert [e["label"] for e in summary["spectra"]] == [
        "LeakyRNNCell a=0.2 n=3",
        "LeakyRNNCell a=0.2 n=5",
        "RNNCell n=3",
        "RNNCell n=5",
    ]
    alignment = {e["label"]: e for e in summary["alignment"]}
    assert abs(alignment["k=3"]["cosine_median"] - 1) <= 1e-12  # k = S is exact
    assert {"k=0", "k=1 topk", "k=1 adversarial", "uoro", "snap"} <= set(alignment)
    drift = {(e["task"], e["regime"], e["method"]) for e in summary["drift"]}
    assert len(drift) == 8
    assert all(e["final_drift"] > 0 for e in summary["drift"])  # float32 run

    study = STUDIES["diagnostics"]
    spec = RunSpec(saved["config"], 0)
    (row,) = study.rows({spec.run_id: summary}, [spec])
    assert row.claim == "C5" and row.verdict in ("reproduced", "not supported")
    assert "n=3" in row.measured and "RNNCell n=5" in row.notes
    assert row.figures == list(FIGURES)


def _spectra_summary(medians: dict[int, float | None]) -> dict:
    entries = [
        {
            "label": f"LeakyRNNCell a=0.2 n={n}",
            "cell": {"kind": "LeakyRNNCell", "alpha": 0.2},
            "hidden_size": n,
            "median_condition": m,
            "median_isotropy": 0.9,
            "rank_deficient_steps": 0 if m is not None else 3,
        }
        for n, m in medians.items()
    ]
    return {"kind": "analyze", "seed": 0, "spectra": entries}


@pytest.mark.parametrize(
    ("medians", "verdict"),
    [
        ({64: 2.0, 128: 3.0, 256: 4.0}, "reproduced"),  # median 3.0 in [2.6, 6.5]
        ({64: 1.2, 128: 1.5, 256: 1.6}, "not supported"),
        ({64: 3.0, 128: None, 256: None}, "not supported"),  # rank-deficient
    ],
)
def test_c5_verdict_rule(medians, verdict):
    from sparse_rtrl.experiments.analyze import c5_row

    row = c5_row([_spectra_summary(medians)], 1)
    assert row.verdict == verdict


def test_quick_and_full_specs_are_analyze_runs():
    from sparse_rtrl.experiments.studies import STUDIES

    study = STUDIES["diagnostics"]
    quick, full = study.specs(True), study.specs(False)
    assert [s.config["kind"] for s in quick] == ["analyze"]
    assert len(full) == 3 and full[0].config["spectra"]["hidden_sizes"] == [
        64,
        128,
        256,
    ]


def test_rank_deficient_trajectory_gives_infinite_median_not_nan():
    from sparse_rtrl.experiments.analyze import _spectrum_stats

    # Condition numbers 2, 4, inf, inf: numpy's linear quantiles of the finite
    # part, None (inf in JSON) where a quantile touches an inf; never nan.
    diag = torch.tensor([[2.0, 1.0], [4.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    stats = _spectrum_stats(spectrum(torch.diag_embed(diag.double())))
    assert stats["median_condition"] is None and stats["q95"] is None
    assert stats["q05"] == pytest.approx(2.3) and stats["q25"] == pytest.approx(3.5)
    assert stats["rank_deficient_steps"] == 2 and not stats["all_finite"]
