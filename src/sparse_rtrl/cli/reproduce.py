"""`sparse-rtrl reproduce`: run every claim's study and write the report."""

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="run every claim's experiments and write report.md"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 seeds, n <= 128, short streams (a few minutes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: results/quick or results/full)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="local worker processes (default 2)"
    )
    parser.add_argument(
        "--scheduler", default=None, help="Dask scheduler address (tcp://host:8786)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of every online run (e.g. for a "
        "smoke test: run.adapt_steps=50)",
    )
    parser.add_argument(
        "--study",
        action="append",
        default=None,
        help="run only this study (repeatable)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import reproduce
    from .sweep import TqdmProgress

    out = args.out or Path("results") / ("quick" if args.quick else "full")
    start = time.perf_counter()
    path = reproduce(
        out,
        quick=args.quick,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=TqdmProgress(),
        studies=args.study,
        overrides=args.overrides,
    )
    print(
        f"reproduce: report written to {path} "
        f"({(time.perf_counter() - start) / 60:.1f} min)"
    )
    return 0
