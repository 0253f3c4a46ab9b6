"""One contract for every registered estimator x every cell it supports.

Read from the registry, so an estimator added there is checked here without
edits: gradient shapes, dtypes and devices match the parameters; values are
finite; results are deterministic under a seed; `reset()` clears the state;
`state_dict` resumes a run exactly; misuse raises the documented errors. Also:
the README's support matrix and `sparse-rtrl list` show the registry's.
"""

import copy
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from conftest import make_cell, make_readout, make_stream
from sparse_rtrl.cells import CELL_KINDS
from sparse_rtrl.cli import main as cli_main
from sparse_rtrl.estimators import ESTIMATORS, support_matrix


README = Path(__file__).resolve().parents[1] / "README.md"

# Support-matrix cell kind -> conftest factory.
FACTORIES = {
    "RNNCell": "rnn_tanh",
    "LeakyRNNCell": "leaky",
    "GRUCell": "gru",
    "LSTMCell": "lstm",
    "generic": "generic",
}
# Non-default options worth covering; every other estimator runs its defaults.
OPTIONS = {
    "sparse_rtrl": [{"num_paths": 2}],
    "snap": [{"order": 1}, {"order": 2}],
    "tbptt": [{"window": 3}],
}
STEPS = 4


def case_id(name, options, kind):
    return "-".join([name, *(f"{k}{v}" for k, v in options.items()), kind])


CASES = [
    pytest.param(name, options, kind, id=case_id(name, options, kind))
    for name in sorted(ESTIMATORS)
    for options in OPTIONS.get(name, [{}])
    for kind in CELL_KINDS
    if kind in ESTIMATORS[name].supported_cells
]
UNSUPPORTED = [
    pytest.param(name, kind, id=f"{name}-{kind}")
    for name in sorted(ESTIMATORS)
    for kind in CELL_KINDS
    if kind not in ESTIMATORS[name].supported_cells
]


def build(name, cell, options, seed=0):
    """The estimator with its options, seeded when it is stochastic."""
    cls = ESTIMATORS[name]
    options = dict(options)
    if "generator" in inspect.signature(cls).parameters:
        options["generator"] = seed
    return cls(cell, **options)


def run(learner, cell, readout, xs, ys):
    """Accumulate `backward` over the stream; the cell's grads (None if untouched)."""
    for param in cell.parameters():
        param.grad = None
    for x, y in zip(xs, ys, strict=True):
        learner.backward(((readout(learner.step(x)) - y) ** 2).sum())
    return [None if p.grad is None else p.grad.clone() for p in cell.parameters()]


def same(a, b):
    return all(
        (x is None and y is None) or (x is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def setup(kind, dtype):
    cell = make_cell(FACTORIES[kind], hidden_size=4, dtype=dtype)
    xs, ys = make_stream(batch=2, steps=STEPS, dtype=dtype)
    return cell, make_readout(cell), xs, ys


@pytest.mark.parametrize(("name", "options", "kind"), CASES)
def test_gradients_match_the_parameters(name, options, kind):
    # float32 here; the other tests of this module run float64.
    cell, readout, xs, ys = setup(kind, torch.float32)
    grads = run(build(name, cell, options), cell, readout, xs, ys)
    if name == "readout_only":
        assert all(g is None for g in grads)  # the cell gets no gradient
        return
    for grad, param in zip(grads, cell.parameters(), strict=True):
        assert grad.shape == param.shape
        assert grad.dtype == param.dtype and grad.device == param.device
        assert bool(torch.isfinite(grad).all())
    assert any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize(("name", "options", "kind"), CASES)
def test_deterministic_reset_and_resume(name, options, kind):
    cell, readout, xs, ys = setup(kind, torch.float64)
    twin = copy.deepcopy(cell)
    learner = build(name, cell, options, seed=3)
    generator = getattr(learner, "generator", None)
    start = None if generator is None else generator.get_state()
    first = run(learner, cell, readout, xs, ys)

    # The same seed on an identical cell gives identical numbers.
    assert same(run(build(name, twin, options, seed=3), twin, readout, xs, ys), first)

    # reset() clears the state, the estimator's memory and the step count ...
    learner.reset()
    assert learner.hidden is None and learner.memory.step_count == 0
    for field in dataclasses.fields(learner.memory):
        if field.name != "step_count":
            assert getattr(learner.memory, field.name) is None, field.name
    # ... so that, with the same random stream, a rerun repeats the first run.
    if generator is not None:
        generator.set_state(start)
    assert same(run(learner, cell, readout, xs, ys), first)

    # state_dict / load_state_dict resume a run exactly (generator included).
    learner.reset()
    half = STEPS // 2
    run(learner, cell, readout, xs[:half], ys[:half])
    saved = learner.state_dict()
    expected = run(learner, cell, readout, xs[half:], ys[half:])
    resumed = build(name, cell, options, seed=99)
    resumed.load_state_dict(saved)
    assert same(run(resumed, cell, readout, xs[half:], ys[half:]), expected)


@pytest.mark.parametrize(("name", "options", "kind"), CASES)
def test_misuse_raises_the_documented_errors(name, options, kind):
    cell, readout, xs, _ = setup(kind, torch.float64)
    learner = build(name, cell, options)
    with pytest.raises(RuntimeError, match="backward was called before any step"):
        learner.backward(readout(torch.zeros(2, 4, dtype=torch.float64)).sum())
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, input_size"):
        learner.step(xs[0, :, :2])
    with pytest.raises(TypeError, match="`x` has dtype torch.float32"):
        learner.step(xs[0].float())
    learner.step(xs[0])
    with pytest.raises(ValueError, match="call reset\\(\\) to change the batch size"):
        learner.step(xs[0, :1])


@pytest.mark.parametrize(("name", "kind"), UNSUPPORTED)
def test_unsupported_cells_name_the_alternatives(name, kind):
    cls = ESTIMATORS[name]
    cell = make_cell(FACTORIES[kind])
    message = (
        f"{cls.__name__} supports {', '.join(cls.supported_cells)}; got "
        f"{type(cell).__name__}. Estimators that support {kind}: "
    )
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        build(name, cell, OPTIONS.get(name, [{}])[0])


def test_registry_keys_are_the_class_names():
    for key, cls in ESTIMATORS.items():
        assert cls.name == key
        assert set(cls.supported_cells) <= set(CELL_KINDS)


def test_readme_support_matrix_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- section: support-matrix", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert "\n".join(table) == support_matrix()


def test_cli_list_prints_every_estimator_and_the_matrix(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert support_matrix() in out
    for key in ESTIMATORS:
        assert f"`{key}`" in out
    for kind in CELL_KINDS:
        assert kind in out
