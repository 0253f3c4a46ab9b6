"""The reproduction report: `report.md` (readable on GitHub) and PNG figures.

`write_report(out_dir, rows, details, figures, meta)` writes the claims table
(one row per claim: claim, paper's figure, measured mean ± std, seeds, CI,
losses, verdict and its criterion, notes), then a detailed table per setting
of the online benchmark (every method: recovery, CI, final and whole-stream
losses, excess over exact RTRL, diverged count), then the figures. Tables are
a pure function of the saved summaries, so `sparse-rtrl report DIR` rebuilds
them identically.
"""

import math
from pathlib import Path

import numpy as np

from . import stats
from .claims import ClaimRow


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_table(rows: list[ClaimRow]) -> str:
    head = (
        "| claim | statement | paper | measured (mean ± std) | seeds | 95 % CI | "
        "final losses (excess over full) | verdict | criterion | notes |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in rows:
        label = row.claim + (" (synthetic data)" if row.synthetic else "")
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    label,
                    row.statement,
                    row.paper,
                    row.measured,
                    row.n_seeds,
                    row.ci,
                    row.losses,
                    f"**{row.verdict}**",
                    row.criterion,
                    row.notes,
                )
            )
            + " |"
        )
    return "\n".join(lines)


def _fmt(values, percent=False) -> str:
    return stats.fmt_mean_std(values, percent=percent) if values else "-"


def detail_table(entry: dict) -> str:
    """Every method of one setting: recovery, CI, losses, excess, divergence."""
    from .studies import measured_text, method_stats

    lines = [
        "| method | recovery | 95 % CI | final loss | whole-stream loss | "
        "excess over full | diverged |",
        "|" + "---|" * 7,
    ]
    order = sorted(entry["methods"], key=_method_order)
    for label in order:
        st = method_stats(entry, label)
        whole = method_stats(entry, label, "loss_all")["losses"]
        rec = measured_text(st) if label not in ("frozen",) else "0 (reference)"
        lines.append(
            "| "
            + " | ".join(
                (
                    label,
                    rec,
                    stats.fmt_ci(st["ci"], percent=True),
                    _fmt(st["losses"]),
                    _fmt(whole),
                    _fmt(st["excess"], True) if label != "frozen" else "-",
                    f"{st['n_div']}/{st['n']}",
                )
            )
            + " |"
        )
    return "\n".join(lines)


def _method_order(label: str):
    head = {"frozen": 0, "full": 1}
    if label in head:
        return (head[label], 0, label)
    if label.startswith("k="):
        k = label.split()[0][2:]
        return (2, math.inf if k == "n" else int(k), label)
    return (3, 0, label)


def detail_tables(summaries: dict, specs: list) -> str:
    from .studies import describe, group

    blocks = []
    for entry in group(summaries, specs).values():
        blocks.append(
            f"#### {describe(entry['config'])}, error "
            f"{entry['config']['run']['error_regime']}\n\n" + detail_table(entry)
        )
    return "\n\n".join(blocks)


def claim_order(row: ClaimRow) -> tuple:
    """C1 < C2 < ... < C11; variants of a claim keep their order."""
    head = row.claim.split()[0].split(",")[0]
    number = int(head[1:]) if head[1:].isdigit() else 99
    return (number, row.claim != head)


def write_report(out_dir: Path, sections: list[dict], meta: dict) -> Path:
    """Write `report.md`; sections = [{"name", "rows", "details", "figures"}]."""
    out_dir = Path(out_dir)
    rows = sorted(
        (row for section in sections for row in section["rows"]), key=claim_order
    )
    text = [f"# Reproduction report ({meta.get('mode', '')})", ""]
    text += [meta.get("preamble", ""), "", "## Claims", "", claims_table(rows), ""]
    text += [
        "Verdicts (DESIGN.md section 5): *reproduced* = the paper's figure lies "
        "in our 95 % CI or within 10 points of our mean; *direction supported* "
        "= the criterion holds but the figure is not reproduced; *not "
        "supported* = the criterion fails; *inconclusive* = the CI straddles "
        "the threshold. Recovery = (L_frozen - L_method) / (L_frozen - "
        "L_full) per seed on the last 50 % of the adaptation stream; n/a when "
        "the gap L_frozen - L_full is below 5 % of L_frozen.",
        "",
    ]
    for section in sections:
        if not section["details"] and not section["figures"]:
            continue
        text += [f"## Study `{section['name']}`", ""]
        if section["details"]:
            text += [section["details"], ""]
        for fig in section["figures"]:
            text += [f"![{Path(fig).stem}](figures/{Path(fig).name})", ""]
    path = out_dir / "report.md"
    from .runio import atomic_write_text

    atomic_write_text(path, "\n".join(text).rstrip() + "\n")
    return path


# Figures -------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> Path:
    path = Path(folder) / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _mean_ci(st):
    if not st["values"]:
        return math.nan, 0.0, 0.0
    mean = float(np.mean(st["values"]))
    lo, hi = st["ci"]
    return mean, mean - lo, hi - mean


def fig_k_sweep(summaries, specs, folder) -> list[Path]:
    from .studies import group, method_stats

    plt = _plt()
    groups = list(group(summaries, specs).values())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for entry in groups:
        n = entry["config"]["cell"]["hidden_size"]
        for self_tag, style in (("", "o-"), (" self", "s--")):
            ks, ys, errs = [], [], []
            for k in (0, 1, 2, 4, 8, 16, "n"):
                st = method_stats(entry, f"k={k}{self_tag}")
                mean, lo, hi = _mean_ci(st)
                ks.append(n if k == "n" else k)
                ys.append(mean)
                errs.append((lo, hi))
            xs = [max(k, 0.5) for k in ks]
            ax.errorbar(
                xs,
                ys,
                yerr=np.array(errs).T,
                fmt=style,
                capsize=3,
                label=f"{entry['config']['cell']['kind']} n={n}"
                f"{' keep_self' if self_tag else ''}",
            )
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(
        xlabel="k (paths per unit; k=0 plotted at 0.5)",
        ylabel="recovery",
        title="Recovery vs k (mean, 95 % CI)",
    )
    ax.legend(fontsize=7)
    return [_save(fig, folder, "recovery_vs_k.png"), *fig_curves(groups, folder)]


def _smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Centred moving average (NaN-aware) over `width` curve points."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        window = values[max(0, i - width // 2) : i + width // 2 + 1]
        window = window[np.isfinite(window)]
        if window.size:
            out[i] = window.mean()
    return out


def fig_curves(groups, folder) -> list[Path]:
    from .studies import describe

    plt = _plt()
    if not groups:
        return []
    entry = groups[0]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = (
        "frozen",
        "full",
        "k=0",
        "k=1",
        "k=4",
        "k=16",
        "snap",
        "uoro",
        "kf_rtrl",
        "rflo",
        "tbptt",
        "readout_only",
    )
    for label in [m for m in shown if m in entry["methods"]]:
        curves = [s for s in entry["methods"][label].values() if "curve_after" in s]
        if not curves:
            continue
        before = np.nanmean(
            [[np.nan if v is None else v for v in c["curve_before"]] for c in curves],
            axis=0,
        )
        after = np.nanmean(
            [[np.nan if v is None else v for v in c["curve_after"]] for c in curves],
            axis=0,
        )
        run = entry["config"]["run"]
        xb = np.linspace(-run["pre_shift_steps"], 0, len(before), endpoint=False)
        xa = np.linspace(0, run["adapt_steps"], len(after), endpoint=False)
        style = "-" if label in shown[:6] else ":"
        ax.plot(
            np.r_[xb, xa],
            _smooth(np.r_[before, after]),
            style,
            label=label,
            lw=1.4 if style == "-" else 1.0,
        )
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set(
        xlabel="step (0 = shift to task B)",
        ylabel="loss (mean over seeds, moving average)",
        title=f"Loss around the shift ({describe(entry['config'])})",
    )
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, ncol=2)
    return [_save(fig, folder, "loss_curves.png")]


def fig_n_scaling(summaries, specs, folder) -> list[Path]:
    from .studies import group, method_stats

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    by_cell: dict = {}
    for entry in group(summaries, specs).values():
        by_cell.setdefault(entry["config"]["cell"]["kind"], []).append(entry)
    for cell, entries in by_cell.items():
        entries.sort(key=lambda e: e["config"]["cell"]["hidden_size"])
        ns = [e["config"]["cell"]["hidden_size"] for e in entries]
        pts = [_mean_ci(method_stats(e, "k=4")) for e in entries]
        ax.errorbar(
            ns,
            [p[0] for p in pts],
            yerr=np.array([p[1:] for p in pts]).T,
            fmt="o-",
            capsize=3,
            label=f"{cell} k=4",
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="n (hidden units)", ylabel="recovery", title="Recovery vs n at k=4")
    ax.legend(fontsize=8)
    return [_save(fig, folder, "recovery_vs_n.png")]


def fig_selection(summaries, specs, folder) -> list[Path]:
    from .studies import group, method_stats

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = {"k=4": "random", "k=4 topk": "top-k", "k=4 adversarial": "adversarial"}
    entries = list(group(summaries, specs).values())
    width = 0.8 / max(len(entries), 1)
    for i, entry in enumerate(entries):
        pts = [_mean_ci(method_stats(entry, lab)) for lab in labels]
        xs = np.arange(len(labels)) + i * width
        ax.bar(
            xs,
            [p[0] for p in pts],
            width,
            yerr=np.array([p[1:] for p in pts]).T,
            capsize=3,
            label=entry["config"]["cell"]["kind"],
        )
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, list(labels.values()))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(ylabel="recovery", title="Selection policies (k=4)")
    ax.legend(fontsize=8)
    return [_save(fig, folder, "selection.png")]


def fig_lorenz(summaries, specs, folder) -> list[Path]:
    from .studies import group, method_stats

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for entry in group(summaries, specs).values():
        for i, label in enumerate(("frozen", "full", "k=4")):
            losses = method_stats(entry, label)["losses"]
            ax.scatter(
                np.full(len(losses), i) + np.linspace(-0.1, 0.1, len(losses)),
                losses,
                label=label,
            )
    ax.set_xticks([0, 1, 2], ["frozen", "full RTRL", "k=4"])
    ax.set_yscale("log")
    ax.set(ylabel="final loss (last 50 %)", title="Lorenz: per-seed final loss")
    return [_save(fig, folder, "lorenz_seeds.png")]


def fig_optimizer(summaries, specs, folder) -> list[Path]:
    from .studies import group, method_stats

    plt = _plt()
    entries = list(group(summaries, specs).values())
    opts = ["sgd", "adam", "rmsprop"]
    dtypes = ["float32", "float64"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, label in zip(axes, ("k=0", "k=4"), strict=True):
        grid = np.full((len(opts), len(dtypes)), np.nan)
        for entry in entries:
            cfg = entry["config"]
            i = opts.index(cfg["optimizer"]["name"])
            j = dtypes.index(cfg["run"]["dtype"])
            grid[i, j] = _mean_ci(method_stats(entry, label))[0]
        image = ax.imshow(grid, vmin=0, vmax=1.1, cmap="viridis")
        for i in range(len(opts)):
            for j in range(len(dtypes)):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="w" if grid[i, j] < 0.6 else "k",
                )
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_yticks(range(len(opts)), opts)
        ax.set_title(f"recovery of {label}")
    fig.colorbar(image, ax=axes, shrink=0.8)
    path = Path(folder) / "optimizer_precision.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


FIGURES = {
    "k_sweep": fig_k_sweep,
    "n_scaling": fig_n_scaling,
    "selection": fig_selection,
    "lorenz": fig_lorenz,
    "optimizer_precision": fig_optimizer,
}
