"""`sparse-rtrl analyze`: J_t spectra, gradient alignment and drift, with figures.

CONFIG is the shipped preset `analyze` (with `--mode quick|full`), a JSON
preset file of the same shape ({"base": ..., "modes": ...}), or a JSON file
holding one analyze config ({"kind": "analyze", ...}; missing keys take the
defaults of `experiments.analyze.DEFAULTS`). Each seed is one run of the
sweep runner (a run folder under OUT/runs/, resumed if finished); then
OUT/analyze.json holds every summary and OUT/analyze_*.png the figures.
"""

import argparse
import json
from pathlib import Path

from . import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="spectra of J_t, gradient alignment and float32 drift, with figures",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("config", metavar="CONFIG", help="'analyze' or a JSON file")
    parser.add_argument(
        "--out", type=Path, default=Path("results/analyze"), help="output folder"
    )
    parser.add_argument(
        "--mode", choices=("quick", "full"), default="quick", help="preset mode"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default: preset's)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (for logs)"
    )
    parser.set_defaults(handler=run)


def load_config(name: str, mode: str) -> tuple[dict, int]:
    """(resolved analyze config, number of seeds) of CONFIG."""
    from ..experiments import analyze

    path = Path(name)
    if name == "analyze" and not path.exists():
        preset = analyze.load_preset(mode)
        return preset["config"], preset["seeds"]
    if not path.is_file():
        raise UserError(
            f"CONFIG {name!r} is neither the preset 'analyze' nor a JSON file."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"CONFIG {name}: not valid JSON ({error}).") from None
    if "base" in data:
        from ..experiments.config import set_dotted

        config = json.loads(json.dumps(data["base"]))
        mode_set = data.get("modes", {}).get(mode, {})
        for key, value in mode_set.get("set", {}).items():
            set_dotted(config, key, value)
        return analyze.resolve_analyze(config), int(mode_set.get("seeds", 1))
    return analyze.resolve_analyze(data), 1


def run(args: argparse.Namespace) -> int:
    from ..experiments import analyze
    from ..experiments.runio import atomic_write_json
    from ..experiments.sweep import RunSpec, run_sweep

    config, seeds = load_config(args.config, args.mode)
    seeds = seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise UserError(f"`--seeds` must be >= 1, got {seeds}.")
    specs = [RunSpec(config, seed) for seed in range(seeds)]
    print(f"analyze: {seeds} run(s) into {args.out}")

    result = run_sweep(specs, args.out, progress=not args.no_progress)
    summaries = [
        result.summaries[s.run_id] for s in specs if s.run_id in result.summaries
    ]
    for run_id, error in result.errors.items():
        print(
            f"analyze: run {run_id[:12]} {error.get('status')}: {error.get('message')}"
        )
    if not summaries:
        return 1

    atomic_write_json(args.out / "analyze.json", {"config": config, "runs": summaries})
    figures = analyze.make_figures(summaries, args.out)
    _print_table(summaries)
    row = analyze.c5_row(summaries, len(specs))
    print(f"C5: {row.measured} -> {row.verdict}")
    print(f"analyze: wrote {args.out / 'analyze.json'}")
    for path in figures:
        print(f"analyze: wrote {path}")
    return 0 if len(summaries) == len(specs) else 1


def _print_table(summaries: list[dict]) -> None:
    first = summaries[0]
    print(f"{'cell':<28} {'median cond':>12} {'isotropy':>9}  (seed {first['seed']})")
    for entry in first["spectra"]:
        cond = entry["median_condition"]
        text = "inf" if cond is None else f"{cond:.3g}"
        print(f"{entry['label']:<28} {text:>12} {entry['median_isotropy']:>9.3f}")
    print(f"{'gradient vs exact':<28} {'cos (median)':>12} {'rel err':>9}")
    for entry in first["alignment"]:
        cos, err = entry["cosine_median"], entry["rel_error_median"]
        cos = "n/a" if cos is None else f"{cos:.4f}"
        err = "n/a" if err is None else f"{err:.3g}"
        print(f"{entry['label'][:28]:<28} {cos:>12} {err:>9}")
    print(f"{'drift run':<40} {'final drift':>12} {'loss_final':>11}")
    for entry in first["drift"]:
        drift = entry["final_drift"]
        loss = entry.get("loss_final")
        drift = "n/a" if drift is None else f"{drift:.3g}"
        loss = "diverged" if entry["diverged"] else f"{loss:.4g}"
        print(f"{entry['label'][:40]:<40} {drift:>12} {loss:>11}")
