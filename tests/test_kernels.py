"""Every fast influence update equals the reference path; `bench` runs and parses."""

import json

import pytest
import torch

from conftest import (
    CELL_FACTORIES,
    make_cell,
    make_readout,
    make_stream,
    online_gradients,
    rel_error,
    state_size,
)
from sparse_rtrl import SparseRTRL, kernels
from sparse_rtrl._native import numba_available
from sparse_rtrl.cli import main


# Tolerances on max|fast - reference| / max|reference|: a few roundings of a
# K-term sum (the fast paths add the terms in another order, with FMA).
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}

FAST = ["torch", "dense"] + (["numba"] if numba_available() else [])
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")


def _random_update(batch, size, num_params, paths, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    influence = torch.randn(batch, size, num_params, generator=gen, dtype=dtype)
    index = torch.randint(0, size, (batch, size, paths), generator=gen)
    weight = torch.randn(batch, size, paths, generator=gen, dtype=dtype)
    return influence, index, weight


def _run(backend, influence, index, weight):
    out = torch.full_like(influence, float("nan"))  # every entry must be written
    with kernels.use_backend(backend):
        kernels.propagate_sparse(influence, index, weight, out)
    return out


def _reference(influence, index, weight):
    """out[b, i] = sum_k w[b, i, k] M[b, idx[b, i, k]], term by term in float64."""
    wide = influence.double()
    out = torch.zeros_like(wide)
    for b, i, k in torch.cartesian_prod(*map(torch.arange, index.shape)).tolist():
        out[b, i] += weight[b, i, k].double() * wide[b, index[b, i, k]]
    return out


# The kernels on random inputs ---------------------------------------------------


def test_reference_matches_the_definition():
    influence, index, weight = _random_update(2, 4, 7, 3, torch.float64)
    out = _run("reference", influence, index, weight)
    assert rel_error([out], [_reference(influence, index, weight)]) < 1e-15


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("paths", [0, 1, 3, 4, 5, 9])
def test_fast_backend_equals_reference(backend, dtype, paths):
    # Repeated paths in a row are legal; K not a multiple of 4 hits the tail loop.
    influence, index, weight = _random_update(3, 9, 301, paths, dtype)
    reference = _run("reference", influence, index, weight)
    out = _run(backend, influence, index, weight)
    assert rel_error([out], [reference]) < TOLERANCE[dtype]


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_tiles_and_threads_cover_every_column(monkeypatch, dtype):
    from sparse_rtrl._native import numba_cpu

    # Tiles of 128 (float32) or 64 (float64) columns, split over 2 threads.
    monkeypatch.setattr(numba_cpu, "CACHE_BYTES", 1)
    monkeypatch.setattr(numba_cpu, "MIN_TILE_BYTES", 64 * 8)
    monkeypatch.setattr(numba_cpu, "MIN_JOB_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    influence, index, weight = _random_update(2, 6, 64 * 5 + 37, 4, dtype)
    out = _run("numba", influence, index, weight)
    expected = _reference(influence, index, weight)
    assert rel_error([out.double()], [expected]) < TOLERANCE[dtype]


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_in_place_equals_out_of_place(monkeypatch, dtype):
    """In place (`out` is `influence`: each tile is copied to a scratch first)
    gives the same bits as into a second buffer, immediate entries and the
    fused gradient included, over several tiles and 2 threads (a thread's run
    of tiles crossing from one stream to the next, entries on tile edges); and
    both equal the definition."""
    from sparse_rtrl._native import numba_cpu

    monkeypatch.setattr(numba_cpu, "CACHE_BYTES", 1)
    monkeypatch.setattr(numba_cpu, "IN_PLACE_CACHE_BYTES", 1)
    monkeypatch.setattr(numba_cpu, "MIN_TILE_BYTES", 64 * 8)
    monkeypatch.setattr(numba_cpu, "MIN_JOB_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    batch, size, num_params, entries = 3, 6, 64 * 5 + 37, 7
    influence, index, weight = _random_update(batch, size, num_params, 5, dtype)
    gen = torch.Generator().manual_seed(1)
    columns = torch.stack(
        [torch.randperm(num_params, generator=gen)[:entries] for _ in range(size)]
    )
    # Unit 0's entries on the edges of the 64- and 128-column tiles.
    columns[0] = torch.tensor([0, 63, 64, 127, 128, 256, num_params - 1])
    columns, order = columns.sort(dim=1)
    values = torch.randn(batch, size, entries, generator=gen, dtype=dtype)
    credit = torch.randn(batch, size, generator=gen, dtype=dtype)
    immediate = (columns, order, values)

    out = torch.full_like(influence, float("nan"))
    grad = numba_cpu.propagate_sparse(influence, index, weight, out, immediate, credit)
    in_place = influence.clone()
    grad_in_place = numba_cpu.propagate_sparse(
        in_place, index, weight, in_place, immediate, credit
    )
    assert torch.equal(in_place, out) and torch.equal(grad_in_place, grad)

    expected = _reference(influence, index, weight)
    rows = torch.arange(size)[:, None].expand(size, entries)
    for b in range(batch):
        expected[b, rows, columns] += values[b].gather(1, order).double()
    assert rel_error([out.double()], [expected]) < TOLERANCE[dtype]
    expected_grad = torch.einsum("bs,bsp->p", credit.double(), expected)
    assert rel_error([grad.double()], [expected_grad]) < TOLERANCE[dtype]


@needs_numba
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads
def test_numba_runs_serially_in_a_forked_child(monkeypatch):
    """After the parent ran the kernel on several threads (GNU OpenMP), a
    forked child still gets the right numbers, on one thread."""
    import multiprocessing

    from sparse_rtrl._native import numba_cpu

    monkeypatch.setattr(numba_cpu, "MIN_JOB_ELEMENTS", 1)
    monkeypatch.setattr(numba_cpu, "CACHE_BYTES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    influence, index, weight = _random_update(2, 6, 64 * 5 + 37, 4, torch.float64)
    parent = _run("numba", influence, index, weight)
    context = multiprocessing.get_context("fork")
    # The child sets torch to one thread, as torch's DataLoader workers do:
    # torch's own parallel copies hang in a forked child of a process that
    # used GNU OpenMP. The patched get_num_threads still says 2, so the
    # kernel's own fork guard is what keeps it on one thread.
    with context.Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        child = pool.apply(_run, ("numba", influence, index, weight))
    assert torch.equal(child, parent)
    assert rel_error([parent], [_reference(influence, index, weight)]) < 1e-12


def test_in_place_needs_the_fused_path():
    cell = make_cell("rnn_tanh", 5)
    learner = SparseRTRL(cell, num_paths=2, generator=0)
    x = torch.zeros(1, cell.input_size, dtype=torch.float64)
    learner.step(x)
    memory = learner.memory
    influence = memory.influence
    immediate = learner.adapter.step(x, memory.state).immediate
    weight = torch.ones(memory.path_index.shape, dtype=torch.float64)
    with kernels.use_backend("torch"), pytest.raises(ValueError, match="in place"):
        kernels.sparse_step(
            learner.adapter, influence, memory.path_index, weight, immediate, influence
        )


def test_torch_backend_several_tiles(monkeypatch):
    monkeypatch.setattr(kernels, "GATHER_BYTES", 1)  # the minimum: 256 columns
    influence, index, weight = _random_update(2, 5, 256 * 3 + 11, 4, torch.float64)
    out = _run("torch", influence, index, weight)
    assert rel_error([out], [_reference(influence, index, weight)]) < 1e-12


def test_exact_update_is_the_product():
    gen = torch.Generator().manual_seed(3)
    jacobian = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    influence = torch.randn(2, 5, 13, generator=gen, dtype=torch.float64)
    out = torch.empty_like(influence)
    kernels.propagate_exact(jacobian, influence, out)
    expected = torch.einsum("bij,bjp->bip", jacobian, influence)
    assert rel_error([out], [expected]) < 1e-15


IMMEDIATE_CASES = [
    f"{kind}-{bias}" for kind in sorted(CELL_FACTORIES) for bias in ("bias", "nobias")
] + ["leaky-masked"]


def _immediate_cell(case):
    from sparse_rtrl import LeakyRNNCell

    if case == "leaky-masked":
        gen = torch.Generator().manual_seed(0)
        mask = (torch.rand(4, 4, generator=gen) > 0.5).float()
        return LeakyRNNCell(3, 4, recurrent_mask=mask).double()
    kind, bias = case.split("-")
    return make_cell(kind, 4, bias=bias == "bias")


@pytest.mark.parametrize("case", IMMEDIATE_CASES)
def test_add_immediate_equals_the_adapter(case):
    cell = _immediate_cell(case)
    learner = SparseRTRL(cell, num_paths=1)
    xs, _ = make_stream(2, 2)
    learner.step(xs[0])  # a nonzero state, so every block of the immediate is
    adapter, state = learner.adapter, learner.memory.state
    with torch.no_grad():
        step = adapter.step(xs[1], state, jacobian=False)
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(
        learner.memory.influence.shape, generator=gen, dtype=state.dtype
    )
    expected, fast = start.clone(), start.clone()
    adapter.add_immediate(expected, step.immediate)
    kernels.add_immediate(adapter, fast, step.immediate)
    assert (expected != start).any()
    assert rel_error([fast], [expected]) < 1e-15


@pytest.mark.parametrize("case", IMMEDIATE_CASES)
def test_add_immediate_in_either_storage_order(case):
    """A column-major influence (RTRL's) gets the same immediate entries as a
    row-major one, by the compact scatter-add and by the adapter's blocks."""
    cell = _immediate_cell(case)
    learner = SparseRTRL(cell, num_paths=1)
    xs, _ = make_stream(2, 2)
    learner.step(xs[0])
    adapter, state = learner.adapter, learner.memory.state
    with torch.no_grad():
        step = adapter.step(xs[1], state, jacobian=False)
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(learner.memory.influence.shape, generator=gen, dtype=state.dtype)
    columns = kernels.with_layout(rows, True)
    assert kernels.column_major(columns) and torch.equal(columns, rows)
    kernels.add_immediate(adapter, rows, step.immediate)
    kernels.add_immediate(adapter, columns, step.immediate)
    assert kernels.column_major(columns)
    assert torch.equal(columns, rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_exact_update_and_gradient_in_either_storage_order(batch):
    gen = torch.Generator().manual_seed(5)
    jacobian = torch.randn(batch, 6, 6, generator=gen, dtype=torch.float64)
    rows = torch.randn(batch, 6, 17, generator=gen, dtype=torch.float64)
    credit = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    columns = kernels.with_layout(rows, True)
    out_rows = torch.empty_like(rows)
    out_columns = torch.empty_like(columns)  # keeps the column-major strides
    kernels.propagate_exact(jacobian, rows, out_rows)
    kernels.propagate_exact(jacobian, columns, out_columns)
    assert kernels.column_major(out_columns)
    assert rel_error([out_columns], [out_rows]) < 1e-15
    expected = torch.einsum("bs,bsp->p", credit, rows)
    for influence in (rows, columns):
        got = kernels.influence_gradient(credit, influence)
        assert rel_error([got], [expected]) < 1e-15


def test_row_reading_backends_refuse_a_column_major_influence():
    influence, index, weight = _random_update(1, 4, 9, 2, torch.float64)
    columns = kernels.with_layout(influence, True)
    for backend in ["torch", "reference"] + (["numba"] if numba_available() else []):
        with kernels.use_backend(backend), pytest.raises(ValueError, match="row-major"):
            kernels.propagate_sparse(columns, index, weight, torch.empty_like(columns))
    with kernels.use_backend("dense"):  # the product takes either order
        out = kernels.propagate_sparse(
            columns, index, weight, torch.empty_like(columns)
        )
    assert rel_error([out], [_reference(influence, index, weight)]) < 1e-15


def test_sparse_rtrl_changes_storage_order_with_its_backend():
    """k = S multiplies column-major on the "dense" backend; switched to a
    gather mid-run the learner moves its influence to row-major and back,
    and its gradients are those of a run on the reference path throughout."""
    kind, dtype = "rnn_tanh", torch.float64
    xs, ys = make_stream(2, 6, dtype=dtype)
    runs = {}
    for plan in (["reference"] * 6, ["auto"] * 2 + ["reference"] * 2 + ["auto"] * 2):
        cell = make_cell(kind, 5, dtype=dtype)
        learner = SparseRTRL(cell, num_paths=5, generator=0)
        readout = make_readout(cell)
        grads, orders = [], []
        for backend, x, y in zip(plan, xs, ys, strict=True):
            with kernels.use_backend(backend):
                grads += online_gradients(learner, cell, readout, [x], [y])
                orders.append(kernels.column_major(learner.memory.influence))
        runs[plan[0]] = (grads, orders)
    assert runs["auto"][1] == [True, True, False, False, True, True]
    assert rel_error(runs["auto"][0], runs["reference"][0]) < 1e-12


@pytest.mark.parametrize("keep_self", [False, True])
def test_floyd_selection_is_a_uniform_subset(keep_self):
    from sparse_rtrl.estimators.sparse_rtrl import FLOYD_MIN_CANDIDATES

    size, paths, batch = FLOYD_MIN_CANDIDATES + 1, 3, 64
    cell = torch.nn.RNNCell(1, size)
    learner = SparseRTRL(cell, num_paths=paths, keep_self=keep_self, generator=0)
    index = learner.select_paths(torch.zeros(batch, size, size))
    drawn = index[:, :, 1:] if keep_self else index
    assert drawn.shape == (batch, size, paths)
    if keep_self:
        assert (index[:, :, 0] == torch.arange(size)).all()
        assert (drawn != torch.arange(size).view(1, size, 1)).all()
    ordered = drawn.sort(dim=2).values
    assert (ordered[:, :, 1:] > ordered[:, :, :-1]).all()  # distinct
    assert drawn.min() >= 0 and drawn.max() < size

    # Each candidate of a row is kept with probability K / candidates.
    candidates = size - 1 if keep_self else size
    offset = (drawn - torch.arange(size).view(1, size, 1)) % size  # 1..S-1 if keep
    counts = torch.bincount(offset.flatten(), minlength=size).double()
    counts = counts[1:] if keep_self else counts
    expected = batch * size * paths / candidates
    spread = (expected * (1 - paths / candidates)) ** 0.5
    assert (counts - expected).abs().max() < 5 * spread


# Through the estimator: every cell kind -----------------------------------------


def _influence_trajectory(kind, dtype, paths, keep_self, backend, steps=4):
    cell = make_cell(kind, 4, dtype=dtype)
    size = state_size(cell)
    learner = SparseRTRL(
        cell, num_paths=min(paths, size), keep_self=keep_self, generator=5
    )
    xs, _ = make_stream(2, steps, dtype=dtype)
    with kernels.use_backend(backend):
        for x in xs:
            learner.step(x)
    return learner.memory.influence.clone()


@pytest.mark.parametrize("kind", sorted(CELL_FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("paths", [0, 1, 99])  # 99 is clipped to S: every path
@pytest.mark.parametrize("keep_self", [False, True])
def test_sparse_rtrl_fast_paths_equal_reference(kind, dtype, paths, keep_self):
    reference = _influence_trajectory(kind, dtype, paths, keep_self, "reference")
    assert reference.abs().max() > 0
    for backend in FAST:
        fast = _influence_trajectory(kind, dtype, paths, keep_self, backend)
        assert rel_error([fast], [reference]) < TOLERANCE[dtype], backend


def _gradient_trajectory(kind, dtype, backend, steps=5):
    cell = make_cell(kind, 6, dtype=dtype)
    learner = SparseRTRL(cell, num_paths=2, keep_self=True, generator=3)
    readout = make_readout(cell)
    xs, ys = make_stream(2, steps, dtype=dtype)
    with kernels.use_backend(backend):
        grads = online_gradients(learner, cell, readout, xs, ys)
        return grads + [learner.memory.influence.clone()]


@pytest.mark.parametrize("kind", sorted(CELL_FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_immediate_added_in_the_update_pass_equals_reference(kind, dtype):
    """The numba backend adds a compact immediate Jacobian inside the update's
    pass: gradients and influence over an online run equal the reference
    path's, which adds it afterwards."""
    reference = _gradient_trajectory(kind, dtype, "reference")
    for backend in FAST:
        fast = _gradient_trajectory(kind, dtype, backend)
        assert rel_error(fast, reference) < TOLERANCE[dtype], backend


# Backend choice -----------------------------------------------------------------


def test_backend_choice_and_restore():
    before = kernels.get_backend()
    with kernels.use_backend("reference"):
        assert kernels.resolve_backend(torch.zeros(1, 1, 1), 1) == "reference"
    assert kernels.get_backend() == before
    with pytest.raises(ValueError, match="must be one of"):
        kernels.set_backend("fastest")


def test_environment_variable_is_checked(monkeypatch):
    monkeypatch.setattr(kernels, "_backend", None)
    monkeypatch.setenv(kernels.ENVIRONMENT_VARIABLE, "torch")
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv(kernels.ENVIRONMENT_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="SPARSE_RTRL_KERNELS"):
        kernels.get_backend()


def test_auto_falls_back_to_torch_without_numba(monkeypatch):
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    influence = torch.zeros(1, 8, 3)
    with kernels.use_backend("auto"):
        assert kernels.resolve_backend(influence, 1) == "torch"
    with kernels.use_backend("numba"), pytest.raises(NotImplementedError, match="fast"):
        kernels.resolve_backend(influence, 1)


def test_auto_picks_torch_off_cpu_float(monkeypatch):
    monkeypatch.setattr(kernels, "numba_available", lambda: True)
    with kernels.use_backend("auto"):
        assert kernels.resolve_backend(torch.zeros(1, 8, 3), 1) == "numba"
        assert kernels.resolve_backend(torch.zeros(1, 8, 3).bfloat16(), 1) == "torch"


@pytest.mark.parametrize(
    ("size", "paths"), [(8, 1), (8, 4), (64, 16), (64, 31), (64, 32), (5, 5)]
)
def test_auto_multiplies_densely_from_half_of_the_paths(size, paths):
    dense = paths >= kernels.DENSE_MIN_FRACTION * size
    with kernels.use_backend("auto"):
        got = kernels.resolve_backend(torch.zeros(1, size, 3), paths)
    assert (got == "dense") == dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_backend_equals_reference():
    influence, index, weight = _random_update(2, 8, 333, 4, torch.float32)
    influence, index, weight = influence.cuda(), index.cuda(), weight.cuda()
    reference = _run("reference", influence, index, weight)
    out = _run("auto", influence, index, weight)
    assert rel_error([out.cpu()], [reference.cpu()]) < TOLERANCE[torch.float32]


# The bench command ----------------------------------------------------------------


def test_bench_smoke(monkeypatch, tmp_path, capsys):
    from sparse_rtrl.experiments import bench

    monkeypatch.setattr(bench, "MIN_BLOCK_S", 0.001)
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "6", "--paths", "0", "2", "--repeats", "1"]
    assert main([*argv, "--json", str(path)]) == 0

    record = json.loads(path.read_text())
    rows = {(r["estimator"], r["k"]): r for r in record["rows"]}
    exact, sparse = rows[("rtrl", 6)], rows[("sparse_rtrl", 2)]
    assert exact["num_params"] == 6 * 1 + 6 * 6 + 2 * 6
    assert exact["vs_exact"] == 1.0
    for row in (exact, sparse):
        assert row["ms_per_step"] > 0 and row["floor_ms"] > 0
        assert row["steps_per_s"] == pytest.approx(1e3 / row["ms_per_step"])
        assert row["vs_floor"] == pytest.approx(row["ms_per_step"] / row["floor_ms"])
    assert {"sparse_rtrl", "rtrl"} <= {r["estimator"] for r in record["rows"]}
    assert "date_utc" in record["machine"] and "cpu" in record["machine"]

    table = [line for line in capsys.readouterr().out.splitlines() if "|" in line]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["estimator", "n", "k", "P", "ms/step"]
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert len(body) == len(record["rows"])
    assert all(len(cells) == len(header) for cells in body)
    exact_cells = next(cells for cells in body if cells[0] == "rtrl")
    assert float(exact_cells[4]) == pytest.approx(exact["ms_per_step"], abs=1e-3)


@pytest.mark.parametrize("kernel", ["reference", "torch", "dense", "numba"])
def test_bench_times_the_update_on_every_backend(kernel, monkeypatch, tmp_path):
    """The update timed alone runs repeatedly on the learner's buffers, on every
    backend (a non-fused backend once kept a graph on its output buffer)."""
    from sparse_rtrl.experiments import bench

    if kernel == "numba" and not kernels.numba_available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(bench, "MIN_BLOCK_S", 0.001)
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "6", "--paths", "2", "--estimators", "sparse_rtrl"]
    argv += ["--kernel", kernel, "--repeats", "2", "--json", str(path)]
    threads, backend = torch.get_num_threads(), kernels.get_backend()
    assert main([*argv, "--threads", "1"]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["backend"] == kernel and row["note"] in (None, "-", "")
    assert row["update_ms"] > 0 and row["ms_per_step"] > 0
    # The process's own settings are back once the command returns.
    assert (torch.get_num_threads(), kernels.get_backend()) == (threads, backend)


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--sizes", "0"]) == 2
    assert "`sizes` must be integers >= 1" in capsys.readouterr().err
    assert main(["bench", "--estimators", "nope"]) == 2
    assert "unknown estimators" in capsys.readouterr().err
