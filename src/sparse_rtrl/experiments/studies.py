"""The studies `sparse-rtrl reproduce` runs: their runs and their report rows.

A `Study` names the claims it tests, builds its run specs (`specs(quick)`),
turns the finished runs into report rows (`rows(summaries, specs)`) and draws
its figures (`figures(summaries, specs, folder)`). `summaries` maps run ids to
summaries; a run that raised appears as `{"status": "diverged" | "failed",
"diverged": bool, "message": str}` so rows can count "n_div/n diverged".

The benchmark's own studies (C1-C4, C6, C7, C10, C11) are built from the
presets in `presets/` (see `config.expand_preset`); each helper adds its
study's entry to `STUDIES` (one line, below the marker).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import claims as C
from . import stats
from .analyze import make_study as _analyze_study
from .claims import ClaimRow
from .config import expand_preset, load_preset, method_label
from .neural.study import make_study as _bci_study
from .transformer_study import make_study as _transformer_study


if TYPE_CHECKING:
    from .sweep import RunSpec


@dataclass(frozen=True)
class Study:
    """The runs and the report rows of one or more claims."""

    name: str
    claims: tuple[str, ...]
    specs: Callable[[bool], list["RunSpec"]]
    rows: Callable[[dict[str, dict], list["RunSpec"]], list[ClaimRow]]
    figures: Callable[[dict[str, dict], list["RunSpec"], Path], list[Path]] | None


# Grouping runs into settings and methods ------------------------------------


def preset_specs(name: str, quick: bool) -> list["RunSpec"]:
    """The run specs of a preset in the quick or full mode."""
    from .sweep import RunSpec

    items = expand_preset(load_preset(name), "quick" if quick else "full")
    return [RunSpec(config, seed) for _, config, seed in items]


def setting_of(config: dict) -> tuple:
    """What a run shares with its references: everything but the estimator."""
    from .runio import canonical_json

    rest = {k: v for k, v in config.items() if k != "estimator"}
    return (canonical_json(rest),)


def group(summaries: dict[str, dict], specs: list["RunSpec"]) -> dict:
    """{setting: {"config": config, "methods": {label: {seed: summary}}}}."""
    out: dict = {}
    for spec in specs:
        if spec.config.get("kind", "online") != "online":
            continue
        entry = out.setdefault(
            setting_of(spec.config), {"config": spec.config, "methods": {}}
        )
        seeds = entry["methods"].setdefault(method_label(spec.config["estimator"]), {})
        seeds[spec.seed] = summaries.get(spec.run_id, {"status": "pending"})
    return out


def find(groups: dict, **where) -> list[dict]:
    """Settings whose config matches dotted-key values, e.g. cell__hidden_size=64."""
    out = []
    for entry in groups.values():
        ok = True
        for key, value in where.items():
            node = entry["config"]
            for part in key.split("__"):
                node = node.get(part) if isinstance(node, dict) else None
            ok &= node == value
        if ok:
            out.append(entry)
    return out


def _finished(summary: dict) -> bool:
    return "loss_final" in summary and not summary.get("diverged")


def method_stats(entry: dict, label: str, window: str = "loss_final") -> dict:
    """Per-seed recovery (None = n/a), losses, excess and diverged count."""
    runs = entry["methods"].get(label, {})
    frozen = entry["methods"].get("frozen", {})
    full = entry["methods"].get("full", {})
    rec, losses, excess, gaps, n_div = [], [], [], [], 0
    for seed, summary in sorted(runs.items()):
        if summary.get("status") == "diverged" or summary.get("diverged"):
            n_div += 1
            continue
        if not _finished(summary):
            continue
        losses.append(summary[window])
        ref_f, ref_x = frozen.get(seed, {}), full.get(seed, {})
        if _finished(ref_f) and _finished(ref_x):
            lf, lx = ref_f[window], ref_x[window]
            rec.append(stats.recovery(lf, summary[window], lx))
            excess.append(stats.excess(summary[window], lx))
            gaps.append(stats.gap(lf, lx))
    values = [r for r in rec if r is not None]
    return {
        "n": len(runs),
        "n_div": n_div,
        "recoveries": rec,
        "values": values,
        "n_na": sum(r is None for r in rec),
        "gaps": gaps,
        "losses": losses,
        "excess": excess,
        "ci": stats.bootstrap_ci(values) if values else None,
        "mean": stats.mean_std(values)[0] if values else None,
    }


def measured_text(st: dict) -> str:
    """ "84 ± 6 %" plus n/a and divergence notes."""
    text = stats.fmt_mean_std(st["values"], percent=True) if st["values"] else "n/a"
    if st["n_na"]:
        pairs = zip(st["recoveries"], st["gaps"], strict=True)
        gaps = ", ".join(f"{100 * g:.1f} %" for r, g in pairs if r is None)
        text += f"; {st['n_na']} seed(s) n/a (gap {gaps})"
    div = stats.fmt_diverged(st["n_div"], st["n"])
    return text + (f"; {div}" if div else "")


def losses_text(entry: dict, labels: tuple[str, ...]) -> str:
    """Final losses (mean ± std) of the references and methods, and the excess."""
    parts = []
    for label in labels:
        st = method_stats(entry, label)
        if not st["losses"]:
            continue
        part = f"{label} {stats.fmt_mean_std(st['losses'])}"
        if label not in ("frozen", "full") and st["excess"]:
            part += f" (excess {stats.fmt_mean_std(st['excess'], percent=True)})"
        parts.append(part)
    return "; ".join(parts)


def _row(
    claim, statement, paper, entry, label, verdict, criterion, notes="", figures=()
) -> ClaimRow:
    st = method_stats(entry, label)
    return ClaimRow(
        claim=claim,
        statement=statement,
        paper=paper,
        measured=measured_text(st),
        n_seeds=len(st["values"]),
        ci=stats.fmt_ci(st["ci"], percent=True),
        losses=losses_text(entry, ("frozen", "full", label)),
        verdict=verdict,
        criterion=criterion,
        notes=notes,
        figures=list(figures),
    )


def describe(config: dict) -> str:
    """Task, cell and size of a setting, for notes."""
    cell = config["cell"]
    kind = cell["kind"] + (
        f"(alpha={cell['alpha']})" if cell["kind"] == "LeakyRNNCell" else ""
    )
    run = config["run"]
    return (
        f"{config['task']['name']}, {kind}, n={cell['hidden_size']}, "
        f"{config['optimizer']['name']} lr={config['optimizer']['lr']:g}, "
        f"{run['dtype']}, T={run['adapt_steps']}, readout "
        f"{'frozen' if run['readout_frozen'] else 'adapting'}"
    )


LOWER = "recovery CI lower bound > 50 %"


# C1 and C4: the k sweep ------------------------------------------------------


def k_sweep_rows(summaries, specs) -> list[ClaimRow]:
    groups = group(summaries, specs)
    rows = []
    for entry in groups.values():
        cell = entry["config"]["cell"]["kind"]
        tag = "" if cell == "LeakyRNNCell" else f" ({cell})"
        st = method_stats(entry, "k=4")
        rows.append(
            _row(
                "C1" + tag,
                "random k=4 of n=64 paths recovers most of full RTRL's adaptation",
                "84 ± 6 % (5 seeds)",
                entry,
                "k=4",
                C.verdict_lower_bound(st["ci"], 0.84, st["mean"]),
                LOWER,
                describe(entry["config"]),
                ["recovery_vs_k.png", "loss_curves.png"],
            )
        )
        k0, k1 = method_stats(entry, "k=0"), method_stats(entry, "k=1")
        row = _row(
            "C4" + tag,
            "step function: k=0 recovers ~0, any k >= 1 recovers most",
            "0 -> most",
            entry,
            "k=0",
            C.verdict_step_function(k0["ci"], k1["ci"]),
            "k=0 CI upper bound < 20 % and k=1 CI lower bound > 50 %",
            describe(entry["config"]),
            ["recovery_vs_k.png"],
        )
        row.measured = f"k=0: {measured_text(k0)}; k=1: {measured_text(k1)}"
        row.ci = (
            f"k=0 {stats.fmt_ci(k0['ci'], True)}; k=1 {stats.fmt_ci(k1['ci'], True)}"
        )
        row.losses = losses_text(entry, ("frozen", "full", "k=0", "k=1"))
        rows.append(row)
    return rows


def n_scaling_rows(summaries, specs) -> list[ClaimRow]:
    groups = group(summaries, specs)
    rows = []
    for cell in ("LeakyRNNCell", "RNNCell"):
        entries = sorted(
            find(groups, cell__kind=cell),
            key=lambda e: e["config"]["cell"]["hidden_size"],
        )
        if not entries:
            continue
        largest = entries[-1]
        st = method_stats(largest, "k=4")
        parts = [
            f"n={e['config']['cell']['hidden_size']}: "
            f"{measured_text(method_stats(e, 'k=4'))}"
            for e in entries
        ]
        row = _row(
            "C2" + ("" if cell == "LeakyRNNCell" else f" ({cell})"),
            "the absolute k=4 stays effective as n grows",
            "84 % -> 78 % (n 64 -> 256)",
            largest,
            "k=4",
            C.verdict_lower_bound(st["ci"], 0.78, st["mean"]),
            LOWER + " at the largest n",
            describe(largest["config"]),
            ["recovery_vs_n.png"],
        )
        row.measured = "; ".join(parts)
        rows.append(row)
    return rows


def selection_rows(summaries, specs) -> list[ClaimRow]:
    rows = []
    for entry in group(summaries, specs).values():
        cell = entry["config"]["cell"]["kind"]
        labels = ("k=4", "k=4 topk", "k=4 adversarial")
        sts = {lab: method_stats(entry, lab) for lab in labels}
        row = _row(
            "C3" + ("" if cell == "LeakyRNNCell" else f" ({cell})"),
            "random, top-k and adversarial selection all work",
            "all recover",
            entry,
            "k=4",
            C.verdict_all_lower_bounds({k: v["ci"] for k, v in sts.items()}),
            "every selection's recovery CI lower bound > 50 %",
            describe(entry["config"]),
            ["selection.png"],
        )
        names = {"k=4": "random", "k=4 topk": "topk", "k=4 adversarial": "adversarial"}
        row.measured = "; ".join(
            f"{names[k]}: {measured_text(v)}" for k, v in sts.items()
        )
        row.ci = "; ".join(
            f"{names[k]} {stats.fmt_ci(v['ci'], True)}" for k, v in sts.items()
        )
        row.losses = losses_text(entry, ("frozen", "full", *labels))
        rows.append(row)
    return rows


def lorenz_rows(summaries, specs) -> list[ClaimRow]:
    rows = []
    for entry in group(summaries, specs).values():
        sparse, full = method_stats(entry, "k=4"), method_stats(entry, "full")
        cv_s, cv_f = stats.cv(sparse["losses"]), stats.cv(full["losses"])
        ci_s, ci_f = stats.cv_ci(sparse["losses"]), stats.cv_ci(full["losses"])
        row = _row(
            "C6",
            "chaotic (Lorenz): sparse is more stable than full RTRL across seeds",
            "CV 13 % vs 88 %",
            entry,
            "k=4",
            C.verdict_cv(cv_s, ci_s, cv_f, ci_f, paper=(0.13, 0.88)),
            "CV (std/mean of the final loss over seeds) of k=4 < CV of exact RTRL",
            describe(entry["config"]),
            ["lorenz_seeds.png"],
        )
        div = [stats.fmt_diverged(s["n_div"], s["n"]) for s in (sparse, full)]
        row.measured = (
            f"CV k=4 {100 * cv_s:.0f} % vs full {100 * cv_f:.0f} %"
            + "".join(f"; {d}" for d in div if d)
        )
        row.n_seeds = min(len(sparse["losses"]), len(full["losses"]))
        row.ci = f"k=4 {stats.fmt_ci(ci_s, True)}; full {stats.fmt_ci(ci_f, True)}"
        row.notes += f"; recovery of k=4: {measured_text(sparse)}"
        rows.append(row)
    return rows


def gated_rows(summaries, specs) -> list[ClaimRow]:
    rows = []
    for entry in group(summaries, specs).values():
        cell = entry["config"]["cell"]["kind"]
        st = method_stats(entry, "k=4")
        rows.append(
            _row(
                "C7" + ("" if cell == "LSTMCell" else f" ({cell})"),
                f"{cell}: k=4 matches full RTRL",
                "~100 %",
                entry,
                "k=4",
                C.verdict_lower_bound(st["ci"], 1.0, st["mean"]),
                LOWER,
                describe(entry["config"])
                + "; k sweep "
                + ", ".join(
                    f"{lab}: {measured_text(method_stats(entry, lab))}"
                    for lab in ("k=0", "k=1", "k=16")
                    if lab in entry["methods"]
                ),
            )
        )
    return rows


def optimizer_rows(summaries, specs) -> list[ClaimRow]:
    groups = group(summaries, specs)
    rows = []
    sgd = find(groups, optimizer__name="sgd", run__dtype="float32")
    if sgd:
        st = method_stats(sgd[0], "k=4")
        rows.append(
            _row(
                "C11",
                "with plain SGD instead of Adam, k=4 still recovers",
                "92 ± 1 %",
                sgd[0],
                "k=4",
                C.verdict_lower_bound(st["ci"], 0.92, st["mean"]),
                LOWER,
                describe(sgd[0]["config"]),
                ["optimizer_precision.png"],
            )
        )
    adam64 = find(groups, optimizer__name="adam", run__dtype="float64")
    if adam64:
        grid = []
        for entry in groups.values():
            cfg = entry["config"]
            opt, dt = cfg["optimizer"]["name"], cfg["run"]["dtype"]
            grid.append(f"{opt}/{dt}: {measured_text(method_stats(entry, 'k=0'))}")
        k0, k4 = method_stats(adam64[0], "k=0"), method_stats(adam64[0], "k=4")
        row = _row(
            "C4 (Adam, float64)",
            "k=0 recovers ~0 (2603.28750 reports k=0 matches "
            "full RTRL with Adam/RMSprop and float64)",
            "0 -> most",
            adam64[0],
            "k=0",
            C.verdict_step_function(k0["ci"], k4["ci"]),
            "k=0 CI upper bound < 20 % and k=4 CI lower bound > 50 % (the grid has "
            "k in {0, 4, n})",
            describe(adam64[0]["config"]) + "; k=0 recovery by "
            "optimizer/dtype: " + "; ".join(grid),
            ["optimizer_precision.png"],
        )
        row.measured = f"k=0: {measured_text(k0)}; k=4: {measured_text(k4)}"
        row.ci = (
            f"k=0 {stats.fmt_ci(k0['ci'], True)}; k=4 {stats.fmt_ci(k4['ci'], True)}"
        )
        rows.append(row)
    return rows


def _ci_text(entry: dict, label: str) -> str:
    return stats.fmt_ci(method_stats(entry, label)["ci"], percent=True)


def regime_rows(summaries, specs) -> list[ClaimRow]:
    groups = group(summaries, specs)
    cont = find(groups, run__error_regime="continuous")
    end = find(groups, run__error_regime="end_of_segment")
    if not cont or not end:
        return []
    cont, end = cont[0], end[0]
    base = stats.mean_std(method_stats(cont, "full")["losses"])[0]
    pairs, parts = {}, []
    for label in ("full", "k=4", "k=1", "k=0"):
        lc = stats.mean_std(method_stats(cont, label)["losses"])[0]
        le = stats.mean_std(method_stats(end, label)["losses"])[0]
        pairs[label] = (lc / base - 1, le / base - 1)
        parts.append(
            f"{label}: {100 * pairs[label][0]:+.0f} % -> {100 * pairs[label][1]:+.0f} %"
        )
    n = min(len(method_stats(e, "full")["losses"]) for e in (cont, end))
    return [
        ClaimRow(
            claim="C10",
            statement="without a continuous error signal all RTRL variants degrade",
            paper="degrade",
            measured="excess over continuous full RTRL, "
            "continuous -> end-of-segment: " + "; ".join(parts),
            n_seeds=n,
            ci=f"recovery of k=4: continuous {_ci_text(cont, 'k=4')}; "
            f"end-of-segment {_ci_text(end, 'k=4')}",
            losses="continuous: "
            + losses_text(cont, ("frozen", "full", "k=4", "k=1", "k=0"))
            + " | end-of-segment: "
            + losses_text(end, ("frozen", "full", "k=4", "k=1", "k=0")),
            verdict=C.verdict_all_larger(pairs),
            criterion="every variant's loss excess (over exact RTRL with continuous "
            "error, segment-end loss in both) is larger end-of-segment than continuous",
            notes=describe(cont["config"]),
            figures=[],
        )
    ]


def _figures(kind: str):
    def draw(summaries, specs, folder):
        from . import report

        return report.FIGURES[kind](summaries, specs, folder)

    return draw


def _study(name: str, claims: tuple[str, ...], rows, figure: str | None) -> Study:
    return Study(
        name,
        claims,
        lambda quick: preset_specs(name, quick),
        rows,
        _figures(figure) if figure else None,
    )


BENCHMARK_STUDIES: dict[str, Study] = {
    "k_sweep": _study("k_sweep", ("C1", "C4"), k_sweep_rows, "k_sweep"),
    "n_scaling": _study("n_scaling", ("C2",), n_scaling_rows, "n_scaling"),
    "selection": _study("selection", ("C3",), selection_rows, "selection"),
    "lorenz": _study("lorenz", ("C6",), lorenz_rows, "lorenz"),
    "gated": _study("gated", ("C7",), gated_rows, None),
    "optimizer_precision": _study(
        "optimizer_precision", ("C4", "C11"), optimizer_rows, "optimizer_precision"
    ),
    "error_regime": _study("error_regime", ("C10",), regime_rows, None),
}


STUDIES: dict[str, Study] = {
    **BENCHMARK_STUDIES,
    # Other helpers' studies (C5 diagnostics, C8 transformer, C9 BCI) below.
    "transformer": _transformer_study(),
    "bci": _bci_study(),
    "diagnostics": _analyze_study(),
}
