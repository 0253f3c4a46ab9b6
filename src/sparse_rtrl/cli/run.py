"""`sparse-rtrl run CONFIG`: run a preset or a config file (all seeds, one sweep).

CONFIG is a preset name (`sparse-rtrl run --list`) or a JSON file holding a
run config or a preset. `--set dotted.key=value` overrides any setting (type
checked against the defaults); `--mode quick|full` picks the preset's sizes.
Runs go through the sweep runner into `--out` (finished runs are skipped);
`--resume` continues interrupted runs from their checkpoints. With one worker
the fixed-format log lines are printed as the runs go.
"""

import argparse
import logging
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a preset or config file (e.g. k_sweep) with --set overrides"
    )
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="preset name or JSON config/preset file",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. cell.hidden_size=128",
    )
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default: the preset's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: runs/<CONFIG name>)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted runs from their checkpoints (bitwise the same "
        "result); without it an interrupted run starts over",
    )
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments import checkpoint
    from ..experiments import config as cfg
    from ..experiments.report import detail_tables
    from ..experiments.sweep import RunSpec, run_sweep
    from . import UserError
    from .sweep import TqdmProgress

    if args.list or args.config is None:
        for name in cfg.preset_names():
            print(f"{name:22s} {cfg.load_preset(name).get('description', '')}")
        return 0
    preset = cfg.load_preset(args.config)
    skipped = cfg.skipped_variants(preset)
    if skipped:
        print(
            f"run: skipping {', '.join(skipped)} (estimator not registered)",
            file=sys.stderr,
        )
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"run: `--seeds` must be >= 1, got {args.seeds}.")
        preset.setdefault("modes", {}).setdefault(args.mode, {})["seeds"] = args.seeds
    items = cfg.expand_preset(preset, args.mode, args.overrides)
    if args.resume:  # read by the runs, also in spawned pool workers
        os.environ[checkpoint.RESUME_VARIABLE] = "1"
    specs = [RunSpec(config, seed) for _, config, seed in items]
    out = args.out or Path("runs") / Path(args.config).stem
    if args.workers == 1:
        _log_to_stdout()
    result = run_sweep(specs, out, workers=args.workers, progress=TqdmProgress())
    summaries = dict(result.summaries)
    for run_id, error in result.errors.items():
        summaries[run_id] = {
            "status": error["status"],
            "diverged": error["status"] == "diverged",
            "message": error["message"],
        }
        print(f"{error['status']}: {result.folders[run_id]}: {error['message']}")
    print(detail_tables(summaries, result.specs))
    print(f"run: {result.done} done, {result.failed} failed -> {out}")
    return 0 if result.failed == 0 else 1


def _log_to_stdout() -> None:
    logger = logging.getLogger("sparse_rtrl.experiments")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
