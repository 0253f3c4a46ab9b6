r"""`sparse-rtrl bench`: the cost of one online step, against its hardware floor.

For every size n (a torch `RNNCell`, tanh, input size 1 by default, so
P = n I + n^2 + 2 n) and every registered estimator, one *online step* is
timed as a user runs it: `learner.step(x)`, a linear readout and MSE loss,
`learner.backward(loss)`, an Adam step (fused where torch offers it) and
`zero_grad`. Each timing is the best of `repeats` blocks of steps (a block
lasts at least `MIN_BLOCK_S`), after two single warm-up calls; a call over
`SLOW_STEP_S` is timed by those two calls only.

Two floors are measured with each row they divide, on buffers of the
learner's influence size, in timed blocks that alternate with the step's (and
then with the update's), so that a shared machine's slow and fast spells fall
on both sides of the ratio:

- the memory floor of any update that stores the dense (B, S, P) influence:
  reading and writing it once, 2 B S P bytes-per-element, at the best-of-N
  bandwidth of `torch.Tensor.copy_` of the influence into a second buffer (so
  the floor is the copy time itself);
- the compute floor of exact RTRL: the best-of-N time of a preallocated
  (S x S) @ (S x P) matmul (`torch.bmm` for B > 1) on the learner's own
  buffers, in their storage order (column-major; see `kernels`).

Columns: ms per step, steps per second, GFLOP/s and GB/s of the influence
update plus the gradient (flops 2 B S K P + 2 B S P with K = S for exact
RTRL; traffic 3 B S P bytes-per-element: read and write the influence, read it
again for c_t M_t, or 2 B S P where the gradient is formed in the update's
pass (sparse, "numba" backend); given for `rtrl` and `sparse_rtrl` only), peak resident
memory of the process during the configuration (Linux; otherwise "-"), the
ratio to exact RTRL's step at the same n, the ratio to the floor (sparse:
memory floor; exact: matmul floor), and for these two the influence update
alone on the learner's own buffers and its ratio to the same floor (exact:
`kernels.propagate_exact`; sparse: `kernels.sparse_step` with a credit, the
paths, the immediate Jacobian and the gradient as `backward` runs them).
"""

import dataclasses
import datetime
import gc
import math
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..estimators import ESTIMATORS


MIN_BLOCK_S = 0.2  # a timed block of steps lasts at least this long
SLOW_STEP_S = 1.0  # above this per call, the best of the two warm-up calls
MAX_BLOCK_STEPS = 500
CELLS = ("rnn", "leaky", "gru", "lstm")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclasses.dataclass
class BenchConfig:
    """What `run_bench` measures; the CLI's options one to one."""

    sizes: tuple[int, ...] = (64, 128, 256, 512)
    paths: tuple[int, ...] = (4,)
    estimators: tuple[str, ...] | None = None  # None: every registered one
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    clock: str = "wall"  # or "cpu": process CPU time (for a shared machine)
    batch: int = 1
    cell: str = "rnn"
    input_size: int = 1
    seed: int = 0


@dataclasses.dataclass
class BenchRow:
    """One measured configuration. Times in ms; None where not applicable."""

    estimator: str
    n: int
    k: int | None
    state_size: int
    num_params: int
    ms_per_step: float | None = None
    steps_per_s: float | None = None
    gflops: float | None = None
    gbs: float | None = None
    peak_mib: float | None = None
    vs_exact: float | None = None
    floor_ms: float | None = None
    vs_floor: float | None = None
    update_ms: float | None = None
    update_vs_floor: float | None = None
    backend: str = "-"
    note: str = ""


def check_config(config: BenchConfig) -> None:
    """Raise ValueError for options outside their range."""
    for name in ("sizes", "paths"):
        values = getattr(config, name)
        low = 1 if name == "sizes" else 0
        if not values or any(int(v) < low for v in values):
            raise ValueError(
                f"bench: `{name}` must be integers >= {low}, got {list(values)}."
            )
    if config.dtype not in DTYPES:
        raise ValueError(
            f"bench: `dtype` must be one of {', '.join(DTYPES)}, got {config.dtype!r}."
        )
    if config.clock not in CLOCKS:
        raise ValueError(
            f"bench: `clock` must be one of {', '.join(CLOCKS)}, got {config.clock!r}."
        )
    if config.cell not in CELLS:
        raise ValueError(
            f"bench: `cell` must be one of {', '.join(CELLS)}, got {config.cell!r}."
        )
    for name in ("repeats", "batch", "input_size"):
        if getattr(config, name) < 1:
            raise ValueError(
                f"bench: `{name}` must be >= 1, got {getattr(config, name)}."
            )
    unknown = sorted(set(config.estimators or ()) - set(ESTIMATORS))
    if unknown:
        raise ValueError(
            f"bench: unknown estimators {unknown}; available: "
            f"{', '.join(sorted(ESTIMATORS))}."
        )
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench: `device` is cuda but torch sees no CUDA device.")


def run_bench(
    config: BenchConfig, progress: Callable[[BenchRow], None] | None = None
) -> list[BenchRow]:
    """Measure every configuration; call `progress` after each row."""
    check_config(config)
    rows = []
    for size in config.sizes:
        rows.extend(_bench_size(config, int(size), progress))
    return rows


def _bench_size(
    config: BenchConfig, size: int, progress: Callable[[BenchRow], None] | None
) -> list[BenchRow]:
    cell = _make_cell(config, size, DTYPES[config.dtype], torch.device(config.device))
    state_size = 2 * size if config.cell == "lstm" else size
    num_params = sum(p.numel() for p in cell.parameters())
    rows = []
    for name, options in _estimator_plan(config, state_size):
        row = BenchRow(name, size, options.get("num_paths"), state_size, num_params)
        if name == "rtrl":
            row.k = state_size
        _measure(config, cell, name, options, row)
        rows.append(row)
        if progress is not None:
            progress(row)

    exact = next((r.ms_per_step for r in rows if r.estimator == "rtrl"), None)
    for row in rows:
        if exact is not None and row.ms_per_step is not None:
            row.vs_exact = row.ms_per_step / exact
    return rows


def _estimator_plan(config: BenchConfig, state_size: int) -> list[tuple[str, dict]]:
    names = config.estimators or tuple(sorted(ESTIMATORS))
    plan = []
    for name in names:
        if name == "sparse_rtrl":
            plan += [
                (name, {"num_paths": int(k), "generator": config.seed})
                for k in config.paths
                if int(k) <= state_size
            ]
        else:
            plan.append((name, {}))
    return plan


def _make_cell(
    config: BenchConfig, size: int, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    from ..cells import LeakyRNNCell

    torch.manual_seed(config.seed)
    factories = {
        "rnn": lambda: nn.RNNCell(config.input_size, size),
        "leaky": lambda: LeakyRNNCell(config.input_size, size),
        "gru": lambda: nn.GRUCell(config.input_size, size),
        "lstm": lambda: nn.LSTMCell(config.input_size, size),
    }
    return factories[config.cell]().to(device=device, dtype=dtype)


# One estimator -----------------------------------------------------------------


def _measure(config, cell, name, options, row) -> None:
    """Fill `row` with the timing of estimator `name` on `cell` (never raises).

    For exact and sparse RTRL the step and the floor are timed in alternating
    blocks, then the update alone and the floor again: a shared machine's
    slow and fast spells then fall on both sides of each ratio, whose floor
    is the best of all its blocks."""
    dense = name in ("rtrl", "sparse_rtrl")
    needed = 2 * math.prod((config.batch, row.state_size, row.num_params))
    needed *= DTYPES[config.dtype].itemsize
    if dense and needed > 0.9 * _available_bytes(config.device):
        row.note = f"skipped: needs {needed / 2**30:.1f} GiB"
        return
    _reset_peak_memory(config.device)
    try:
        learner = ESTIMATORS[name](cell, **options)
        step = _online_step(config, cell, learner)
        # One step has run: the learner's buffers exist; the floor's do not count.
        row.peak_mib = _peak_memory_mib(config.device)
        if dense:
            floor = _floor_call(learner, name)
            seconds, floor_s = _best_times([step, floor], config)
        else:
            seconds = _best_time(step, config)
    except (RuntimeError, MemoryError, ValueError, TypeError) as error:
        row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"
        return
    row.ms_per_step = 1e3 * seconds
    row.steps_per_s = 1.0 / seconds
    if dense:
        _dense_columns(config, learner, row, seconds, floor, floor_s)
        del floor
    del learner, step
    gc.collect()


def _dense_columns(config, learner, row, seconds, floor, floor_s) -> None:
    itemsize = DTYPES[config.dtype].itemsize
    elements = config.batch * row.state_size * row.num_params
    if row.estimator == "sparse_rtrl":
        row.backend = kernels.resolve_backend(
            learner.memory.influence, learner.memory.path_index.shape[2]
        )
    else:
        row.backend = "bmm"
    passes = 2 if row.backend == "numba" else 3  # numba: gradient in the pass
    row.gflops = 2 * elements * (row.k + 1) / seconds / 1e9
    row.gbs = passes * elements * itemsize / seconds / 1e9
    update = _update_call(learner, row.estimator)
    update_s, floor_again = _best_times([update, floor], config)
    row.floor_ms = 1e3 * min(floor_s, floor_again)
    row.vs_floor = row.ms_per_step / row.floor_ms
    row.update_ms = 1e3 * update_s
    row.update_vs_floor = row.update_ms / row.floor_ms


def _floor_call(learner, name: str) -> Callable[[], object]:
    """The row's floor on buffers of its learner's influence size: for exact
    RTRL a preallocated matmul of its shape into its spare buffer (which the
    next step overwrites whole), for sparse `copy_` of its influence into a
    buffer of the same size (reading and writing it once)."""
    memory = learner.memory
    influence = memory.influence
    if name != "rtrl":
        target = torch.empty_like(influence)
        return lambda: target.copy_(influence)
    batch, size, _ = influence.shape
    left = torch.randn(batch, size, size, dtype=influence.dtype)
    left = left.to(influence.device)
    if batch == 1:  # the buffers swap every step: read them at each call
        return lambda: torch.mm(left[0], memory.influence[0], out=memory._spare[0])
    return lambda: torch.bmm(left, memory.influence, out=memory._spare)


def _update_call(learner, name: str) -> Callable[[], object]:
    """The influence update alone, on the learner's own buffers."""
    memory = learner.memory
    if name == "rtrl":
        batch, size = memory.state.shape
        jacobian = torch.randn(batch, size, size, dtype=memory.influence.dtype)
        jacobian = jacobian.to(memory.influence.device) / math.sqrt(size)
        return lambda: kernels.propagate_exact(
            jacobian, memory.influence, memory._spare
        )
    # Sparse: Eq. (1) and (2) as the learner runs them in `backward` (the paths,
    # the immediate Jacobian and, where the backend fuses it, the gradient).
    dtype, device = memory.influence.dtype, memory.influence.device
    weight = torch.randn(memory.path_index.shape, dtype=dtype).to(device)
    credit = torch.randn(memory.state.shape, dtype=dtype).to(device)
    x = torch.zeros(memory.state.shape[0], learner.cell.input_size, dtype=dtype)
    with torch.no_grad():  # as in `learner.step`: no graph on the buffers
        immediate = learner.adapter.step(x.to(device), memory.state).immediate
    influence = memory.influence
    fused = kernels.fuses_update(
        learner.adapter, influence, memory.path_index, immediate
    )
    out = influence if fused else torch.empty_like(influence)  # in place if fused
    return lambda: kernels.sparse_step(
        learner.adapter, influence, memory.path_index, weight, immediate, out, credit
    )


def _online_step(config: BenchConfig, cell: nn.Module, learner) -> Callable:
    """One whole online step as a closure (inputs drawn up front)."""
    param = next(cell.parameters())
    hidden = getattr(cell, "hidden_size", None)
    readout = nn.Linear(hidden, 1).to(param)
    optimizer = _adam(list(cell.parameters()) + list(readout.parameters()))
    generator = torch.Generator().manual_seed(config.seed)
    stream = torch.randn(64, config.batch, config.input_size, generator=generator)
    targets = torch.randn(64, config.batch, 1, generator=generator)
    stream, targets = stream.to(param), targets.to(param)
    clock = [0]

    def step() -> None:
        t = clock[0] % 64
        clock[0] += 1
        h = learner.step(stream[t])
        loss = nn.functional.mse_loss(readout(h), targets[t])
        learner.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    step()  # exact RTRL's first step skips the propagation: keep it out
    return step


def _adam(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Adam with the fused kernel where torch offers it, else foreach."""
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


# Timing and floors -------------------------------------------------------------


def _best_time(fn: Callable[[], object], config: BenchConfig) -> float:
    """Best seconds per call over `config.repeats` blocks (two warm-up calls)."""
    return _best_times([fn], config)[0]


def _best_times(fns: list[Callable[[], object]], config: BenchConfig) -> list[float]:
    """`_best_time` of each function, their blocks taken in turn."""
    firsts = [min(_timed_block(fn, 1, config) for _ in range(2)) for fn in fns]
    calls = [
        max(1, min(MAX_BLOCK_STEPS, int(MIN_BLOCK_S / max(first, 1e-6))))
        for first in firsts
    ]
    # The best of the two calls is enough for a call over SLOW_STEP_S.
    best = [first if first > SLOW_STEP_S else math.inf for first in firsts]
    for _ in range(config.repeats):
        for i, fn in enumerate(fns):
            if firsts[i] <= SLOW_STEP_S:
                best[i] = min(best[i], _timed_block(fn, calls[i], config))
    return best


def _timed_block(fn: Callable[[], object], calls: int, config: BenchConfig) -> float:
    clock = CLOCKS[config.clock]
    _synchronize(config.device)
    start = clock()
    for _ in range(calls):
        fn()
    _synchronize(config.device)
    return (clock() - start) / calls


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _available_bytes(device: str) -> float:
    if torch.device(device).type == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak_memory_mib(device: str) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# Report ------------------------------------------------------------------------


COLUMNS = (
    ("estimator", "estimator", "{}"),
    ("n", "n", "{}"),
    ("k", "k", "{}"),
    ("num_params", "P", "{}"),
    ("ms_per_step", "ms/step", "{:.3f}"),
    ("steps_per_s", "steps/s", "{:.4g}"),
    ("gflops", "GFLOP/s", "{:.1f}"),
    ("gbs", "GB/s", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("vs_exact", "vs exact", "{:.3f}"),
    ("floor_ms", "floor ms", "{:.3f}"),
    ("vs_floor", "vs floor", "{:.2f}"),
    ("update_ms", "update ms", "{:.3f}"),
    ("update_vs_floor", "update vs floor", "{:.2f}"),
    ("backend", "backend", "{}"),
    ("note", "note", "{}"),
)


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of the rows, one line per configuration."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for field, _, spec in COLUMNS:
            value = getattr(row, field)
            cells.append("-" if value is None or value == "" else spec.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description(config: BenchConfig) -> dict[str, object]:
    """Date, machine, library versions and load: the header of a bench table."""
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M"
        ),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": config.device,
        "dtype": config.dtype,
        "batch": config.batch,
        "clock": config.clock,
        "cell": f"{config.cell}, input size {config.input_size}",
        "numba": _numba_version(),
    }
    if torch.device(config.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numba_version() -> str:
    from .._native import numba_available

    if not numba_available():
        return "absent"
    import numba

    return numba.__version__
