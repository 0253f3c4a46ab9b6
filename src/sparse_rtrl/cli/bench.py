"""`sparse-rtrl bench`: time one online step per estimator and size."""

import argparse
import contextlib
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the online step of every estimator against its hardware floor",
        description=(
            "Time one whole online step (forward, influence update, gradient, "
            "Adam) per estimator and size, with the memory floor (copy_ of the "
            "influence) and the matmul floor of exact RTRL measured in the same "
            "run. Prints a markdown table."
        ),
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 128, 256, 512], metavar="N"
    )
    parser.add_argument(
        "--paths",
        type=int,
        nargs="+",
        default=[4],
        metavar="K",
        help="paths per unit of sparse_rtrl (default 4)",
    )
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        metavar="NAME",
        help="registry keys to time (default: every registered estimator)",
    )
    parser.add_argument("--dtype", default="float32", help="float32 or float64")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed blocks, best taken (default 5)"
    )
    parser.add_argument("--batch", type=int, default=1, help="streams B (default 1)")
    parser.add_argument(
        "--clock",
        default="wall",
        help="wall (default) or cpu: process CPU time, steadier on a shared machine",
    )
    parser.add_argument(
        "--cell", default="rnn", help="rnn (tanh RNNCell, default), leaky, gru, lstm"
    )
    parser.add_argument("--input-size", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--kernel",
        default=None,
        help="sparse update backend: auto, numba, torch, reference (default auto)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows to this file"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the bench with `--threads` and `--kernel` in force, then restore
    torch's thread count and the kernel backend (for callers in-process)."""
    import torch

    from .. import kernels

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"bench: `--threads` must be >= 1, got {args.threads}.")
    threads = torch.get_num_threads()
    backend = contextlib.nullcontext()
    if args.kernel is not None:
        backend = kernels.use_backend(args.kernel)
    try:
        torch.set_num_threads(args.threads or threads)
        with backend:
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from ..experiments import bench

    config = bench.BenchConfig(
        sizes=tuple(args.sizes),
        paths=tuple(args.paths),
        estimators=None if args.estimators is None else tuple(args.estimators),
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        batch=args.batch,
        clock=args.clock,
        cell=args.cell,
        input_size=args.input_size,
    )
    bench.check_config(config)
    machine = bench.machine_description(config)

    def progress(row: bench.BenchRow) -> None:
        took = "-" if row.ms_per_step is None else f"{row.ms_per_step:.3f} ms/step"
        k = "" if row.k is None else f" k={row.k}"
        print(
            f"bench: n={row.n} {row.estimator}{k}: {took} {row.note}",
            file=sys.stderr,
            flush=True,
        )

    rows = bench.run_bench(config, progress)
    machine["load_average_end"] = bench.machine_description(config).get(
        "load_average", "-"
    )
    for key, value in machine.items():
        print(f"- {key}: {value}")
    print()
    print(bench.format_table(rows))
    if args.json is not None:
        record = {"machine": machine, "rows": [vars(row) for row in rows]}
        args.json.write_text(json.dumps(record, indent=2))
    return 0
