"""`sparse-rtrl list`: estimators and cells, and what supports what."""

import argparse

from ..cells import CELL_KINDS
from ..estimators import ESTIMATORS, support_matrix


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "list", help="list estimators and cells, with the support matrix"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print("estimators: " + ", ".join(sorted(ESTIMATORS)))
    print("cells: " + ", ".join(CELL_KINDS))
    print()
    print(support_matrix())
    return 0
