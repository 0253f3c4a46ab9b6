"""`sparse-rtrl report DIR`: rebuild report.md and figures from saved results."""

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="rebuild report.md and figures of a reproduce folder"
    )
    parser.add_argument("dir", type=Path, metavar="DIR")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import build_report

    print(f"report: written to {build_report(args.dir)}")
    return 0
