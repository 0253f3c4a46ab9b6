"""`sparse-rtrl sweep`: run a grid of configs x seeds, locally or on Dask."""

import argparse
import sys
from pathlib import Path

from ..experiments.sweep import RunSpec, SweepProgress, SweepResult
from . import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of configs x seeds (local processes or a Dask cluster)",
        description=(
            'Expand SWEEP_CONFIG, a JSON file {"base": {...}, "grid": '
            '{"dotted.key": [values]}, "seeds": [0, 1] or n}, into runs and '
            "run those not finished yet. Rerunning resumes; failed runs are retried."
        ),
    )
    parser.add_argument("sweep_config", type=Path, metavar="SWEEP_CONFIG")
    parser.add_argument(
        "--workers", type=int, default=1, help="local worker processes (default 1)"
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Dask scheduler, e.g. tcp://host:8786 (needs the dask extra)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep folder (default sweeps/<name>)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per run (default 1 with several workers or Dask)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs and their status only"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments import sweep

    specs, run_fn = sweep.load_sweep_file(args.sweep_config)
    out = args.out or Path("sweeps") / args.sweep_config.stem
    if args.dry_run:
        return _print_plan(sweep.collect(specs, out))

    try:
        result = sweep.run_sweep(
            specs,
            out,
            workers=args.workers,
            scheduler=args.scheduler,
            run_fn=run_fn,
            torch_threads=args.torch_threads,
            progress=TqdmProgress(),
        )
    except ImportError as error:
        raise UserError(str(error)) from None

    print(
        f"sweep: {result.done} done ({result.resumed} already), {result.failed} "
        f"failed ({result.diverged} diverged), {result.pending} pending "
        f"-> {out / 'sweep.json'}"
    )
    for run_id, error in result.errors.items():
        folder = result.folders[run_id]
        print(f"  {error['status']}: {folder}: {error['type']}: {error['message']}")
    return 0 if result.failed == 0 and result.pending == 0 else 1


def _print_plan(result: SweepResult) -> int:
    for spec in result.specs:
        print(f"{result.statuses[spec.run_id]:8s} {result.folders[spec.run_id]}")
    print(f"{len(result.specs)} runs, {result.done} finished")
    return 0


class TqdmProgress(SweepProgress):
    """A tqdm bar over runs, with the failure count in its postfix.

    Implements `experiments.sweep.SweepProgress`; without tqdm (the
    `experiments` extra) it prints nothing.
    """

    def __init__(self) -> None:
        self.bar = None

    def start(self, total: int, result: SweepResult) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=result.done, unit="run", file=sys.stderr)
        self.bar.set_postfix(failed=0)

    def update(self, spec: RunSpec, outcome: dict, result: SweepResult) -> None:
        if self.bar is not None:
            self.bar.set_postfix(failed=result.failed, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
