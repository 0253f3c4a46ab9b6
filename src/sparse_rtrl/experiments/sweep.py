"""Sweeps: many independent runs on a local process pool or a Dask cluster.

A sweep is a list of `RunSpec` (a resolved config and a seed). `run_sweep`
gives each run a folder `out_dir/runs/<folder_name>/` (DESIGN.md section 9):

- `config.json`: `{"config": ..., "seed": ..., "run_id": ...}`, by the sweep;
- `argv.txt`: the command line of the sweep that (last) started the run;
- `env.json`: `runio.env_record()` of the process that ran it;
- `metrics.jsonl`: appended by `run_fn` while it runs (cleared on a retry);
- `summary.json`: `run_fn`'s return value, written atomically; its presence
  means *finished*, and a finished run is never run again;
- `error.json`: `{"status": "failed" | "diverged", "type", "message",
  "traceback", ...}` when `run_fn` raised (removed when a retry succeeds).

Rerunning the same sweep therefore resumes it: only runs without a
`summary.json` (missing, interrupted or failed) are run. `out_dir/sweep.json`
(atomic, rewritten after every run) lists each run's status and the counts
done / failed / diverged / pending of the latest call.

Where the runs go:

- `workers=1` (default): one after the other in this process.
- `workers=N > 1`: a `concurrent.futures.ProcessPoolExecutor` of N processes
  started with the "spawn" method (forking a process that has loaded torch is
  fragile; call `run_sweep` under `if __name__ == "__main__":` in scripts).
  Each worker calls `torch.set_num_threads(1)` so that N workers do not
  oversubscribe the cores; `torch_threads` overrides this. At most N runs are
  in flight; if a worker process dies, the runs in flight are rerun one at a
  time and the one that dies alone is recorded as failed.
- `scheduler="tcp://host:8786"`: a Dask distributed cluster (the `dask` extra).
  Workers need only this package and a file system shared with `out_dir`
  (the runs write into their folders); `torch_threads` defaults to 1 there too.

`run_fn` is a "module:function" string, imported lazily where the run
executes, with the signature `run_fn(config: dict, seed: int, run_dir: Path)
-> dict` (a JSON-serialisable summary). An exception whose class, or one of its
base classes, is named `Diverged` (e.g. `experiments.runner.Diverged`, or
`Diverged` below) is recorded with status "diverged"; any other exception with
status "failed". Either way the other runs go on.

Test hook: if the environment variable `SPARSE_RTRL_SWEEP_KILL_AFTER=N` is set,
the sweep sends SIGKILL to its own process group right after the N-th run of
this call has been recorded (used to test that a killed sweep resumes cleanly).

Limitations: a run folder is owned by one sweep at a time; two sweeps running
the same run concurrently (same `out_dir`) would both run it. `sweep.json`
describes only the runs of the latest call on `out_dir`. Each call on a pool
pays the start-up of its worker processes (importing torch: seconds).
"""

import collections
import contextlib
import dataclasses
import datetime
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from . import runio


DEFAULT_RUN_FN = "sparse_rtrl.experiments.runner:run_one"
KILL_AFTER_ENV = "SPARSE_RTRL_SWEEP_KILL_AFTER"
STATUSES = ("done", "failed", "diverged", "pending")


class Diverged(RuntimeError):
    """A run blew up (non-finite loss or state); recorded with status "diverged".

    The sweep recognises any exception class named `Diverged` (or derived from
    one), so `experiments.runner` may define its own or subclass this one.
    """


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a resolved, JSON-serialisable config and a seed.

    Attributes:
        config: the resolved config; for the default runner it has a "kind".
        seed: the run's seed.
    """

    config: dict
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.config, dict):
            raise TypeError(
                f"RunSpec: `config` expected a dict, got {type(self.config).__name__}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"RunSpec: `seed` expected an int, got {self.seed!r}.")
        try:
            runio.canonical_json(self.config)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"RunSpec: `config` must be JSON-serialisable ({error}); "
                "use plain dicts, lists, strings, numbers, booleans and None."
            ) from None

    def __hash__(self) -> int:
        return hash(self.run_id)

    @functools.cached_property
    def run_id(self) -> str:
        """sha256 of the canonical JSON of `{"config": config, "seed": seed}`."""
        return runio.config_hash({"config": self.config, "seed": self.seed})

    @property
    def folder_name(self) -> str:
        """The run's folder under `out_dir/runs/`: short hash and seed."""
        return f"{self.run_id[:12]}-s{self.seed}"


@dataclasses.dataclass
class SweepResult:
    """What a sweep produced, keyed by run id.

    Attributes:
        out_dir: the sweep's folder.
        specs: the runs, in order, without duplicates.
        summaries: `run_id -> summary` of the finished runs.
        errors: `run_id -> error record` of the failed and diverged runs.
        statuses: `run_id -> "done" | "failed" | "diverged" | "pending"`.
        folders: `run_id -> run folder`.
        seconds: `run_id -> wall time` of the runs executed by this call.
        resumed: how many runs were already finished before this call.
    """

    out_dir: Path
    specs: list[RunSpec]
    summaries: dict[str, dict] = dataclasses.field(default_factory=dict)
    errors: dict[str, dict] = dataclasses.field(default_factory=dict)
    statuses: dict[str, str] = dataclasses.field(default_factory=dict)
    folders: dict[str, Path] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    resumed: int = 0

    def count(self, status: str) -> int:
        """How many runs have this status ("failed" includes "diverged")."""
        if status == "failed":
            return self.count("diverged") + sum(
                value == "failed" for value in self.statuses.values()
            )
        return sum(value == status for value in self.statuses.values())

    @property
    def done(self) -> int:
        return self.count("done")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def diverged(self) -> int:
        return self.count("diverged")

    @property
    def pending(self) -> int:
        return self.count("pending")

    def record(self, spec: RunSpec, outcome: dict) -> None:
        """Store one run's outcome (see `execute_run`)."""
        run_id = spec.run_id
        self.statuses[run_id] = outcome["status"]
        if "seconds" in outcome:
            self.seconds[run_id] = outcome["seconds"]
        if outcome["status"] == "done":
            self.summaries[run_id] = outcome["summary"]
            self.errors.pop(run_id, None)
        else:
            self.errors[run_id] = outcome["error"]

    def to_json(self) -> dict:
        """The content of `sweep.json`."""
        runs = {}
        for spec in self.specs:
            entry = {
                "folder": str(self.folders[spec.run_id].relative_to(self.out_dir)),
                "seed": spec.seed,
                "status": self.statuses[spec.run_id],
            }
            if spec.run_id in self.seconds:
                entry["seconds"] = self.seconds[spec.run_id]
            if spec.run_id in self.errors:
                entry["error"] = self.errors[spec.run_id]
            runs[spec.run_id] = entry
        counts = {status: self.count(status) for status in STATUSES}
        counts["total"] = len(self.specs)
        counts["resumed"] = self.resumed
        return {"counts": counts, "runs": runs, "time": _now()}


class SweepProgress:
    """Progress callbacks of `run_sweep` (the CLI's tqdm bar implements them)."""

    def start(self, total: int, result: SweepResult) -> None:
        """Called once, after finished runs were found; `total` = all runs."""

    def update(self, spec: RunSpec, outcome: dict, result: SweepResult) -> None:
        """Called after each run's outcome has been recorded."""

    def close(self) -> None:
        """Called once at the end, also on errors."""


# --- building sweeps -------------------------------------------------------


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `config["a"]["b"] = value` for `key="a.b"`, creating missing levels."""
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ValueError(
                f"Sweep grid: key {key!r} goes through {prefix!r}, which is "
                f"{node!r}, not a section; use a key that names a config entry."
            )
    node[leaf] = value


def expand_grid(
    base: dict,
    grid: dict[str, Sequence] | None,
    seeds: int | Sequence[int],
    resolve: Callable[[dict], dict] | None = None,
) -> list[RunSpec]:
    """The runs of a grid: every combination of grid values, times every seed.

    Args:
        base: the config shared by all runs.
        grid: dotted key (e.g. "estimator.num_paths") -> list of values.
        seeds: a list of seeds, or n for seeds 0..n-1.
        resolve: applied to each expanded config (validation, defaults).

    Returns:
        The runs, grid points in order (the last key varying fastest), each
        followed by its seeds.
    """
    grid = dict(grid or {})
    seeds = _seed_list(seeds)
    for key, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(
                f"Sweep grid: {key!r} expected a non-empty list of values, "
                f"got {values!r}."
            )
    specs = []
    for point in itertools.product(*grid.values()):
        config = json.loads(json.dumps(base))
        for key, value in zip(grid, point, strict=True):
            set_dotted(config, key, value)
        config = resolve(config) if resolve is not None else config
        specs.extend(RunSpec(config, seed) for seed in seeds)
    return specs


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        return list(range(seeds))
    is_list = isinstance(seeds, list | tuple) and len(seeds) > 0
    if is_list and all(type(seed) is int for seed in seeds):
        return list(seeds)
    raise ValueError(
        "Sweep: `seeds` expected a positive int n (seeds 0..n-1) or a non-empty "
        f"list of ints, got {seeds!r}."
    )


def default_resolve() -> Callable[[dict], dict] | None:
    """`experiments.config.resolve` if that module exists, else None."""
    try:
        module = importlib.import_module("sparse_rtrl.experiments.config")
    except ModuleNotFoundError as error:
        if error.name != "sparse_rtrl.experiments.config":
            raise
        return None
    return getattr(module, "resolve", None)


def load_sweep_file(path: str | os.PathLike) -> tuple[list[RunSpec], str]:
    """Read a sweep file and expand it into runs.

    The file is JSON: `{"base": {...}, "grid": {"dotted.key": [values]},
    "seeds": [0, 1, 2] or 3, "run_fn": "module:function"}`; only "base" is
    required (seeds default to [0]). When "run_fn" is the default runner,
    `experiments.config.resolve` (if present) validates each config and fills
    its defaults, so a run's identity is that of its resolved config.

    Returns:
        The runs, and the run function's "module:function" string.
    """
    path = Path(path)
    try:
        sweep = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Sweep file {str(path)!r} is not valid JSON: {error}."
        ) from None
    allowed = {"base", "grid", "seeds", "run_fn"}
    if not isinstance(sweep, dict) or "base" not in sweep or set(sweep) - allowed:
        raise ValueError(
            f"Sweep file {str(path)!r}: expected an object with keys "
            f"{sorted(allowed)} ('base' required), got "
            f"{sorted(sweep) if isinstance(sweep, dict) else type(sweep).__name__}."
        )
    run_fn = sweep.get("run_fn", DEFAULT_RUN_FN)
    resolve = default_resolve() if run_fn == DEFAULT_RUN_FN else None
    specs = expand_grid(
        sweep["base"], sweep.get("grid"), sweep.get("seeds", [0]), resolve
    )
    return specs, run_fn


# --- executing one run (in a worker, or in this process) --------------------


def import_run_fn(run_fn: str) -> Callable[[dict, int, Path], dict]:
    """Import a "module:function" string."""
    module_name, function_name = _split_run_fn(run_fn)
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(
            f"Sweep: `run_fn` {run_fn!r}: module {module_name!r} has no function "
            f"{function_name!r}."
        )
    return function


def _split_run_fn(run_fn: str) -> tuple[str, str]:
    module_name, _, function_name = str(run_fn).partition(":")
    if not module_name or not function_name:
        raise ValueError(f"Sweep: `run_fn` expected 'module:function', got {run_fn!r}.")
    return module_name, function_name


def execute_run(
    run_fn: str, config: dict, seed: int, run_dir: str, torch_threads: int | None
) -> dict:
    """Run one run and write its result files; never raises for a run's error.

    Writes `env.json`, clears a stale `metrics.jsonl`, calls `run_fn`, then
    writes `summary.json` (and removes an old `error.json`) or `error.json`.

    Returns:
        `{"status": "done", "summary": ..., "seconds": ...}`, or
        `{"status": "failed" | "diverged", "error": {...}, "seconds": ...}`.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    with _torch_threads(torch_threads):
        try:
            _prepare_attempt(run_dir)
            summary = import_run_fn(run_fn)(config, seed, run_dir)
            runio.atomic_write_json(run_dir / "summary.json", summary)
        except Exception as error:  # a run's error is data
            record = error_record(error, time.perf_counter() - start)
            runio.atomic_write_json(run_dir / "error.json", record)
            status, seconds = record["status"], record["seconds"]
            return {"status": status, "error": record, "seconds": seconds}
    (run_dir / "error.json").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {"status": "done", "summary": summary, "seconds": seconds}


def _prepare_attempt(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp*"):  # left by a killed atomic write
        stale.unlink(missing_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    runio.atomic_write_json(run_dir / "env.json", runio.env_record())


def error_record(error: BaseException, seconds: float) -> dict:
    """The `error.json` record of an exception raised by a run."""
    names = [cls.__name__ for cls in type(error).__mro__]
    return {
        "status": "diverged" if "Diverged" in names else "failed",
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "seconds": seconds,
        "time": _now(),
    }


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_pool_worker(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def selftest_run(config: dict, seed: int, run_dir: Path) -> dict:
    """A tiny CPU-bound run function for testing sweeps and clusters.

    Multiplies seeded random float64 matrices of size `config["size"]` (64)
    `config["repeats"]` (10) times and returns a checksum that depends only on
    the config and seed. Options: `"fail": "message"` raises ValueError,
    `"diverge": true` raises `Diverged`, `"crash": true` ends the process
    (never use it in this process), `"log": path` appends "start"/"end"
    lines naming the run to that file (to count invocations). Use it as
    `"run_fn": "sparse_rtrl.experiments.sweep:selftest_run"` in a sweep file
    to check a Dask cluster before sending it real work.
    """
    import torch

    _selftest_log(config, run_dir, "start")
    generator = torch.Generator().manual_seed(seed)
    size, repeats = int(config.get("size", 64)), int(config.get("repeats", 10))
    a = torch.randn(size, size, generator=generator, dtype=torch.float64) / size**0.5
    product = torch.eye(size, dtype=torch.float64)
    for step in range(repeats):
        product = torch.tanh(a @ product)
        runio.append_jsonl(run_dir / "metrics.jsonl", {"step": step})
    if config.get("fail"):
        raise ValueError(str(config["fail"]))
    if config.get("crash"):
        os._exit(3)  # a process dying without an exception (segfault, OOM kill)
    if config.get("diverge"):
        raise Diverged(f"selftest: diverged at step {repeats} on purpose")
    _selftest_log(config, run_dir, "end")
    return {"checksum": float(product.sum()), "size": size, "seed": seed}


def _selftest_log(config: dict, run_dir: Path, event: str) -> None:
    if config.get("log"):
        line = f"{event} {Path(run_dir).name} {os.getpid()}\n"
        with open(config["log"], "a", encoding="utf-8") as file:
            file.write(line)


# --- the sweep ----------------------------------------------------------------


def run_sweep(
    specs: Iterable[RunSpec],
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    scheduler: Any = None,
    progress: bool | SweepProgress | None = True,
    run_fn: str = DEFAULT_RUN_FN,
    torch_threads: int | None = None,
) -> SweepResult:
    """Run every unfinished run of a sweep and collect all results.

    Args:
        specs: the runs (duplicates, i.e. equal run ids, are run once).
        out_dir: the sweep folder; runs go to `out_dir/runs/<folder_name>/`.
        workers: local worker processes (1: run in this process).
        scheduler: a Dask scheduler address ("tcp://host:8786") or a
            `distributed.Client`; overrides `workers`.
        progress: True for the CLI's tqdm bar, False/None for none, or a
            `SweepProgress`.
        run_fn: "module:function" run function, imported where runs execute.
        torch_threads: torch threads per run; default 1 with several local
            workers or with Dask, and unchanged when runs execute here.

    Returns:
        The `SweepResult`; `out_dir/sweep.json` holds the same information.
    """
    specs = _unique(specs)
    out_dir = Path(out_dir)
    _check_count("workers", workers)
    if torch_threads is not None:
        _check_count("torch_threads", torch_threads)
    if scheduler is None:
        import_run_fn(run_fn)  # fail early on a typo; Dask workers import it
    else:
        _split_run_fn(run_fn)
    if torch_threads is None and (workers > 1 or scheduler is not None):
        torch_threads = 1
    result = _collect(specs, out_dir)
    todo = [spec for spec in specs if result.statuses[spec.run_id] != "done"]
    _prepare_folders(todo, result)
    reporter = _make_progress(progress)
    try:
        reporter.start(len(specs), result)
        _drive(todo, result, reporter, workers, scheduler, run_fn, torch_threads)
    finally:
        runio.atomic_write_json(out_dir / "sweep.json", result.to_json())
        reporter.close()
    return result


def collect(specs: Iterable[RunSpec], out_dir: str | os.PathLike) -> SweepResult:
    """The state of a sweep's runs read from their folders, running nothing."""
    return _collect(_unique(specs), Path(out_dir))


def _unique(specs: Iterable[RunSpec]) -> list[RunSpec]:
    unique = {}
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(
                f"run_sweep: `specs` expected RunSpec items, got "
                f"{type(spec).__name__}; build them with RunSpec(config, seed)."
            )
        unique.setdefault(spec.run_id, spec)
    return list(unique.values())


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"run_sweep: `{name}` expected an int >= 1, got {value!r}.")


def _collect(specs: list[RunSpec], out_dir: Path) -> SweepResult:
    result = SweepResult(out_dir=out_dir, specs=specs)
    for spec in specs:
        folder = out_dir / "runs" / spec.folder_name
        result.folders[spec.run_id] = folder
        result.statuses[spec.run_id] = "pending"
        outcome = _read_outcome(folder)
        if outcome is not None:
            result.record(spec, outcome)
    result.resumed = result.done
    return result


def _read_outcome(folder: Path) -> dict | None:
    # Files are written atomically, so a present file is complete; the
    # JSONDecodeError guard only covers files edited by hand.
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return {"status": "done", "summary": runio.read_json(folder / "summary.json")}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        error = runio.read_json(folder / "error.json")
        return {"status": error.get("status", "failed"), "error": error}
    return None


def _prepare_folders(todo: list[RunSpec], result: SweepResult) -> None:
    argv = shlex.join(sys.argv) + "\n"
    for spec in todo:
        folder = result.folders[spec.run_id]
        if not (folder / "config.json").exists():  # its content is the run id's
            record = {"config": spec.config, "seed": spec.seed, "run_id": spec.run_id}
            runio.atomic_write_json(folder / "config.json", record)
        argv_file = folder / "argv.txt"
        if not argv_file.exists() or argv_file.read_text(encoding="utf-8") != argv:
            runio.atomic_write_text(argv_file, argv)


def _make_progress(progress: bool | SweepProgress | None) -> SweepProgress:
    if isinstance(progress, SweepProgress):
        return progress
    if progress:
        from ..cli.sweep import TqdmProgress  # the bar belongs to the CLI layer

        return TqdmProgress()
    return SweepProgress()


def _drive(todo, result, reporter, workers, scheduler, run_fn, threads) -> None:
    if scheduler is not None:
        outcomes = _run_dask(todo, result, scheduler, run_fn, threads)
    elif workers > 1:
        outcomes = _run_pool(todo, result, workers, run_fn, threads)
    else:
        outcomes = _run_here(todo, result, run_fn, threads)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    for recorded, (spec, outcome) in enumerate(outcomes, start=1):
        _record(spec, outcome, result)
        reporter.update(spec, outcome, result)
        if recorded == kill_after:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _record(spec: RunSpec, outcome: dict, result: SweepResult) -> None:
    # The executing process already wrote these files; writing them here too
    # keeps results when the workers' file system is not the sweep's.
    folder = result.folders[spec.run_id]
    name = "summary.json" if outcome["status"] == "done" else "error.json"
    if not (folder / name).exists():
        content = outcome["summary" if name == "summary.json" else "error"]
        runio.atomic_write_json(folder / name, content)
    result.record(spec, outcome)
    runio.atomic_write_json(result.out_dir / "sweep.json", result.to_json())


def _run_here(todo, result, run_fn, threads) -> Iterator[tuple[RunSpec, dict]]:
    for spec in todo:
        folder = str(result.folders[spec.run_id])
        yield spec, execute_run(run_fn, spec.config, spec.seed, folder, threads)


def _run_pool(todo, result, workers, run_fn, threads) -> Iterator:
    # At most `workers` runs are submitted at a time, so that when a worker
    # process dies (segfault, OOM kill) only the runs in flight are suspects.
    # Suspects are rerun alone in a fresh pool: one that kills its process
    # again is the culprit and is recorded as failed; the others just finish.
    queue, suspects = collections.deque(todo), collections.deque()
    while queue or suspects:
        executor = _spawn_pool(workers, threads)
        broken = False
        in_flight = {}
        try:
            while in_flight or (not broken and (queue or suspects)):
                if not broken:
                    broken = _submit_some(
                        executor,
                        queue,
                        suspects,
                        in_flight,
                        workers,
                        run_fn,
                        result,
                        threads,
                    )
                if not in_flight:
                    continue
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec, alone = in_flight.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool as error:
                        broken = True
                        if not alone:
                            suspects.append(spec)
                            continue
                        outcome = _crash_outcome(error)
                    yield spec, outcome
        finally:
            executor.shutdown(wait=not broken, cancel_futures=True)


def _spawn_pool(workers: int, threads: int | None) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_pool_worker,
        initargs=(threads,),
    )


def _submit_some(
    executor, queue, suspects, in_flight, workers, run_fn, result, threads
) -> bool:
    """Fill free workers (a suspect only into an empty pool); True if broken."""
    while len(in_flight) < workers and (queue or suspects):
        alone = bool(suspects)
        if alone and in_flight:
            return False
        spec = (suspects if alone else queue).popleft()
        folder = str(result.folders[spec.run_id])
        try:
            future = executor.submit(
                execute_run, run_fn, spec.config, spec.seed, folder, threads
            )
        except BrokenProcessPool:
            (suspects if alone else queue).appendleft(spec)
            return True
        in_flight[future] = (spec, alone)
        if alone:
            return False
    return False


def _crash_outcome(error: BaseException) -> dict:
    record = error_record(error, 0.0)
    record["message"] = (
        f"the process running this run died ({type(error).__name__}: {error}); "
        "rerun the sweep to retry it"
    )
    return {"status": "failed", "error": record}


def _run_dask(todo, result, scheduler, run_fn, threads) -> Iterator:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            "run_sweep: `scheduler` needs Dask distributed; install the extra "
            "with `pip install sparse-rtrl[dask]`."
        ) from None
    if isinstance(scheduler, distributed.Client):
        client, owned = scheduler, False
    else:
        client, owned = distributed.Client(scheduler, set_as_default=False), True
    try:
        futures = {
            client.submit(
                execute_run,
                run_fn,
                spec.config,
                spec.seed,
                str(result.folders[spec.run_id]),
                threads,
                key=f"sparse-rtrl-{spec.folder_name}-{os.urandom(4).hex()}",
                pure=False,
            ): spec
            for spec in todo
        }
        for future in distributed.as_completed(futures, loop=client.loop):
            spec = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # e.g. KilledWorker
                outcome = _crash_outcome(error)
            yield spec, outcome
    finally:
        if owned:
            client.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
