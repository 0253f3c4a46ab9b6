"""The `sparse-rtrl` console script: one subcommand per module of this package.

Each module listed in `SUBCOMMANDS` defines `register(subparsers)`, which adds
its parser and sets `handler=` to a function taking the parsed arguments and
returning an exit code. Errors a user can fix (`UserError`, `ValueError`,
`TypeError`, `NotImplementedError`, `FileNotFoundError`) are printed as one
line on stderr with exit code 2, without a traceback.
"""

import argparse
import importlib
import sys


SUBCOMMANDS = ("list_", "sweep", "bench", "run", "reproduce", "report", "analyze")


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-rtrl",
        description="Exact and sparse RTRL: experiments, benchmarks and reports.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (
        UserError,
        ValueError,
        TypeError,
        NotImplementedError,
        FileNotFoundError,
        KeyError,
    ) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"sparse-rtrl {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparse-rtrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
