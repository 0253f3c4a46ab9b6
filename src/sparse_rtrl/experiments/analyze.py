r"""The `analyze` experiment: spectra, gradient alignment and drift (claim C5).

`run_analyze(config, seed, run_dir)` (run kind "analyze") measures, on the
benchmark's own networks (pretrained on task A by `protocol.prepare`, cached
and shared with the online runs of the same task, cell, pretraining and
seed), three things along task-B streams:

1. **spectra**: for every cell x hidden size of `spectra`, the spectrum of
   the recurrent Jacobian J_t at every step of the stream, the network
   running forward without learning (`diagnostics.trajectory_spectra`):
   condition number, effective rank, isotropy, rank deficiency.
2. **alignment**: for every cell of `alignment`, sparse RTRL for each k of
   `num_paths` (k = 0 included, random selection), the selection policies at
   `policy_paths` (random, topk, adversarial, random with `keep_self`,
   random with `rescale`) and every other registered estimator that
   supports the cell, side by side with exact RTRL on the same stream and
   parameters, without optimizer steps (`diagnostics.GradientComparison`):
   per-step cosine and relative error of the gradient c_t M_t, and of the
   gradient accumulated over the stream (the BPTT gradient of the summed
   loss). Run in `alignment.dtype` (float64 by default, so that rounding
   does not blur cosines near 1).
3. **drift**: for every task x error regime x method of `drift`, the online-
   adaptation loop of `protocol.online_loop` (the same losses, optimizer steps
   and divergence checks as the benchmark) in float32, with the learner's step
   wrapped by a `diagnostics.TrajectoryRecorder`: the influence norm
   ||M_t||_F, the relative Frobenius drift of the float32 influence against a
   float64 shadow run on the same inputs and parameters, the J_t condition
   number over time, and every ~steps/20 steps the singular values of M_t
   (sigma_max, sigma_min, effective rank). The learning rate is the
   benchmark's table value unless `drift.lr` is set. The end-of-segment regime
   on a next-step task (sine, Lorenz), where every step has an error, gives
   the error (and the optimizer step) at every `segment_length`-th step only;
   the loss is still evaluated at every step.

The summary holds the statistics and the curves the figures need
(`make_figures`), so `sparse-rtrl report` can redraw them. `make_study()` is
the C5 study of `sparse-rtrl reproduce`: its row is the median condition
number of J_t for the benchmark's default cell (LeakyRNNCell, alpha = 0.2,
every size measured), judged by DESIGN.md section 5's rule (in [2.6, 6.5]),
with every other cell measured named in the notes.
"""

import dataclasses
import inspect
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import diagnostics
from ..cells import adapt, cell_kind
from ..estimators import ESTIMATORS, SparseRTRL, make_estimator
from . import protocol
from .claims import ClaimRow, verdict_range
from .config import resolve
from .runner import Diverged


C5_RANGE = (2.6, 6.5)
DEFAULT_CELL = {"kind": "LeakyRNNCell", "alpha": 0.2}
SELECTION_POLICIES = (
    ("random", {}),
    ("topk", {"selection": "topk"}),
    ("adversarial", {"selection": "adversarial"}),
    ("random keep_self", {"keep_self": True}),
    ("random rescale", {"rescale": True}),
)
FIGURES = ("analyze_condition.png", "analyze_alignment.png", "analyze_drift.png")

DEFAULTS: dict = {
    "kind": "analyze",
    "pretrain": {},  # protocol.PretrainConfig fields; {} = the benchmark's
    "warmup_steps": 50,  # task-A steps run forward before any recording
    "spectra": {
        "task": "delayed_recall",
        "hidden_sizes": [64, 128, 256],  # a cell entry may give its own
        "cells": [
            {"kind": "LeakyRNNCell", "alpha": 0.1},
            {"kind": "LeakyRNNCell", "alpha": 0.2},
            {"kind": "LeakyRNNCell", "alpha": 0.5},
            {"kind": "RNNCell"},
        ],
        "steps": 200,
    },
    "alignment": {
        "task": "delayed_recall",
        "hidden_size": 64,
        "cells": [{"kind": "LeakyRNNCell", "alpha": 0.2}],
        "steps": 200,
        "dtype": "float64",
        "num_paths": [0, 1, 2, 4, 8, 16, 32, 64],
        "policy_paths": 4,
        "baselines": True,
    },
    "drift": {
        "tasks": ["sine", "lorenz"],
        "regimes": ["continuous", "end_of_segment"],
        "segment_length": 10,
        "hidden_size": 64,
        "cell": {"kind": "LeakyRNNCell", "alpha": 0.2},
        "methods": [
            {"label": "rtrl", "name": "rtrl", "options": {}},
            {"label": "sparse k=4", "name": "sparse_rtrl", "options": {"num_paths": 4}},
        ],
        "steps": 1000,
        "optimizer": "adam",
        "lr": None,  # None: the benchmark's table (presets/learning_rates.json)
        "curve_points": 100,
    },
}


# Config ------------------------------------------------------------------------


def resolve_analyze(config: dict) -> dict:
    """`config` over `DEFAULTS`, section by section; unknown keys are errors."""
    if not isinstance(config, dict) or config.get("kind", "analyze") != "analyze":
        raise ValueError(
            "analyze: `config` must be a dict with kind 'analyze', got "
            f"{config.get('kind') if isinstance(config, dict) else type(config)}."
        )
    out = json.loads(json.dumps(DEFAULTS))
    for key, value in config.items():
        if key not in out:
            raise ValueError(
                f"analyze: unknown config key `{key}`; valid: {', '.join(out)}."
            )
        if isinstance(out[key], dict) and key != "pretrain":
            if not isinstance(value, dict):
                raise TypeError(f"analyze: `{key}` must be a dict, got {value!r}.")
            unknown = sorted(set(value) - set(out[key]))
            if unknown:
                raise ValueError(
                    f"analyze: unknown key(s) {', '.join(unknown)} in `{key}`; "
                    f"valid: {', '.join(out[key])}."
                )
            out[key].update(value)
        else:
            out[key] = value
    return json.loads(json.dumps(out))


def load_preset(mode: str = "quick") -> dict:
    """The shipped analyze preset resolved for `mode` ("quick" or "full")."""
    from .config import set_dotted

    text = resources.files(__package__).joinpath("presets/analyze.json")
    preset = json.loads(text.read_text(encoding="utf-8"))
    if mode not in preset["modes"]:
        raise ValueError(
            f"analyze: `mode` must be one of {', '.join(preset['modes'])}, "
            f"got {mode!r}."
        )
    config = json.loads(json.dumps(preset["base"]))
    for key, value in preset["modes"][mode].get("set", {}).items():
        set_dotted(config, key, value)
    return {"config": resolve_analyze(config), "seeds": preset["modes"][mode]["seeds"]}


def online_config(
    config: dict,
    task: str,
    cell: dict,
    hidden_size: int,
    steps: int,
    *,
    dtype: str = "float32",
    regime: str = "continuous",
    optimizer: str = "adam",
    lr: float | None = None,
    estimator: dict | None = None,
) -> dict:
    """The benchmark ("online") config of one network, resolved.

    The estimator (default exact RTRL) does not enter the pretraining cache
    key, so every part shares the networks of the same task, cell and seed.
    """
    cell_cfg = {"kind": cell["kind"], "hidden_size": int(hidden_size)}
    if "alpha" in cell:
        cell_cfg["alpha"] = cell["alpha"]
    return resolve(
        {
            "task": {"name": task},
            "cell": cell_cfg,
            "pretrain": config["pretrain"],
            "optimizer": {"name": optimizer, "lr": lr},
            "estimator": estimator or {"name": "rtrl", "options": {}},
            "run": {
                "adapt_steps": int(steps),
                "pre_shift_steps": int(config["warmup_steps"]),
                "dtype": dtype,
                "error_regime": regime,
                "log_every": int(steps) + 1,
            },
        }
    )


def _cell_only(cell: dict) -> dict:
    """The cell kind (and alpha) of a cell entry, without its sizes."""
    return {key: cell[key] for key in ("kind", "alpha") if key in cell}


def cell_label(cell: dict, hidden_size: int | None = None) -> str:
    """ "LeakyRNNCell a=0.2 n=64"-style label."""
    text = cell["kind"] + (f" a={cell['alpha']}" if "alpha" in cell else "")
    return text if hidden_size is None else f"{text} n={hidden_size}"


# The run -----------------------------------------------------------------------


def run_analyze(config: dict, seed: int, run_dir: Path | None = None) -> dict:
    """One analyze run (see the module docstring); returns its summary."""
    config = resolve_analyze(config)
    cache = None if run_dir is None else Path(run_dir).parent.parent / "cache"
    metrics = None if run_dir is None else Path(run_dir) / "metrics.jsonl"

    spectra = measure_spectra(config, seed, cache)
    _log_part(metrics, "spectra", spectra)
    alignment = measure_alignment(config, seed, cache)
    _log_part(metrics, "alignment", alignment)
    drift = measure_drift(config, seed, cache)
    _log_part(metrics, "drift", drift)

    return {
        "kind": "analyze",
        "seed": int(seed),
        "spectra": spectra,
        "alignment": alignment,
        "drift": drift,
        # The analyze run has no adaptation loss of its own; the drift runs
        # carry theirs. `diverged` is True when any drift run diverged.
        "loss_all": None,
        "loss_final": None,
        "diverged": any(entry["diverged"] for entry in drift),
    }


def _log_part(path: Path | None, part: str, entries: list[dict]) -> None:
    if path is None:
        return
    from . import runio

    keys = ("label", "median_condition", "cosine_median", "final_drift", "diverged")
    for entry in entries:
        record = {"part": part, **{k: entry[k] for k in keys if k in entry}}
        runio.append_jsonl(path, record)


def _network(online: dict, seed: int, cache: Path | None):
    """The pretrained (cell, readout) and the (task A, task B) streams."""
    cell, readout, before, after, net = protocol.prepare(online, seed, cache)
    return cell, readout, before, after, net["final_loss"]


def _inputs(stream, dtype: torch.dtype) -> torch.Tensor:
    """A protocol stream's inputs as (T, B, I)."""
    return torch.as_tensor(stream.inputs, dtype=dtype).transpose(0, 1)


# 1. Spectra ----------------------------------------------------------------------


def measure_spectra(config: dict, seed: int, cache: Path | None) -> list[dict]:
    """J_t spectra for every cell x size of `config["spectra"]`."""
    part = config["spectra"]
    out = []
    for cell_spec in part["cells"]:
        for size in cell_spec.get("hidden_sizes", part["hidden_sizes"]):
            online = online_config(config, part["task"], cell_spec, size, part["steps"])
            cell, _, before, after, pretrain_loss = _network(online, seed, cache)
            state = _final_state(cell, _inputs(before, torch.float32))
            found = diagnostics.trajectory_spectra(
                cell, _inputs(after, torch.float32), state
            )
            entry = _spectrum_stats(found)
            entry.update(
                label=cell_label(cell_spec, size),
                cell=_cell_only(cell_spec),
                hidden_size=int(size),
                task=part["task"],
                pretrain_loss=_finite_or_none(pretrain_loss),
            )
            out.append(entry)
    return out


@torch.no_grad()
def _final_state(cell, inputs: torch.Tensor) -> torch.Tensor:
    adapter = adapt(cell)
    state = adapter.initial_state(inputs.shape[1])
    for x in inputs:
        state = adapter.step(x, state, jacobian=False).state
    return state


def _spectrum_stats(found: diagnostics.Spectrum) -> dict:
    cond = found.condition_number.double().flatten().numpy()
    finite = cond[np.isfinite(cond)]
    quantiles = {f"q{q:02d}": _quantile(cond, q / 100) for q in (5, 25, 75, 95)}
    return {
        "median_condition": _quantile(cond, 0.5),
        **quantiles,
        "min_condition": _finite_or_none(cond.min()),
        "max_condition": _finite_or_none(cond.max()),
        "rank_deficient_steps": int(found.rank_deficient.sum()),
        "steps": int(cond.size),
        "median_effective_rank": float(found.effective_rank.median()),
        "median_isotropy": float(found.isotropy.median()),
        "median_sigma_max": float(found.singular_values[..., 0].median()),
        "median_sigma_min": float(found.singular_values[..., -1].median()),
        "condition_curve": _curve(cond, 100),
        "all_finite": bool(finite.size == cond.size),
    }


# 2. Alignment --------------------------------------------------------------------


def alignment_estimators(cell, part: dict, mask_seed: int) -> dict:
    """label -> estimator on `cell`: sparse RTRL per k and policy, and baselines."""
    size = adapt(cell).state_size
    out = {}
    for k in part["num_paths"]:
        k = size if k == "all" else int(k)
        if 0 <= k <= size:
            out[f"k={k}"] = SparseRTRL(cell, num_paths=k, generator=mask_seed + k)
    k = min(int(part["policy_paths"]), size)
    for index, (name, options) in enumerate(SELECTION_POLICIES):
        label = f"k={k} {name}"
        if name == "random" and label.split()[0] in out:
            continue
        out[label] = SparseRTRL(
            cell, num_paths=k, generator=mask_seed + 1000 + index, **options
        )
    if part["baselines"]:
        out.update(_baselines(cell, mask_seed))
    return out


def _baselines(cell, mask_seed: int) -> dict:
    out = {}
    for name, cls in sorted(ESTIMATORS.items()):
        if (
            name in ("rtrl", "sparse_rtrl")
            or cell_kind(cell) not in cls.supported_cells
        ):
            continue
        options = {}
        if "generator" in inspect.signature(cls.__init__).parameters:
            options["generator"] = mask_seed + 2000
        out[name] = make_estimator(name, cell, **options)
    return out


def measure_alignment(config: dict, seed: int, cache: Path | None) -> list[dict]:
    """Gradient cosine and relative error against exact RTRL, per estimator."""
    part = config["alignment"]
    dtype = protocol.DTYPES[part["dtype"]]
    mask_seed = protocol.derive_seeds(seed)["mask"] % (2**31)
    out = []
    for cell_spec in part["cells"]:
        size = part["hidden_size"]
        online = online_config(
            config, part["task"], cell_spec, size, part["steps"], dtype=part["dtype"]
        )
        cell, readout, before, after, _ = _network(online, seed, cache)
        comparison = diagnostics.GradientComparison(
            cell, alignment_estimators(cell, part, mask_seed)
        )
        # The task-A warm-up runs through every estimator too (not recorded).
        warm = len(before.inputs[0]) if config["warmup_steps"] > 0 else 0
        streams = (before, after) if warm else (after,)
        for stream in streams:
            targets = torch.as_tensor(stream.targets[0], dtype=dtype)
            for t, x in enumerate(_inputs(stream, dtype)):
                comparison.step(x, _mse(readout, targets[t]))
        for label, series in comparison.history().items():
            series = {key: values[warm:] for key, values in series.items()}
            out.append(_alignment_stats(label, series, cell_spec, size))
    return out


def _mse(readout, target: torch.Tensor):
    return lambda hidden: ((readout(hidden)[0] - target) ** 2).mean()


def _alignment_stats(label: str, series: dict, cell_spec: dict, size: int) -> dict:
    cos = series["cosine"].numpy()
    err = series["rel_error"].numpy()
    name, _, policy = label.partition(" ")
    return {
        "label": label,
        "estimator": "sparse_rtrl" if label.startswith("k=") else label,
        "num_paths": int(name[2:]) if label.startswith("k=") else None,
        "policy": policy or ("random" if label.startswith("k=") else None),
        "cell": cell_spec,
        "hidden_size": int(size),
        "cosine_median": _nan_stat(np.nanmedian, cos),
        "cosine_mean": _nan_stat(np.nanmean, cos),
        "cosine_q25": _nan_stat(lambda a: np.nanquantile(a, 0.25), cos),
        "cosine_q75": _nan_stat(lambda a: np.nanquantile(a, 0.75), cos),
        "rel_error_median": _nan_stat(np.nanmedian, err),
        "cum_cosine_final": _finite_or_none(series["cum_cosine"][-1].item()),
        "cum_rel_error_final": _finite_or_none(series["cum_rel_error"][-1].item()),
        "cosine_curve": _curve(cos, 100),
    }


# 3. Drift ------------------------------------------------------------------------


class _RecordedLearner:
    """A learner whose `step` goes through a recorder (for `protocol.online_loop`)."""

    def __init__(self, recorder: diagnostics.TrajectoryRecorder) -> None:
        self.recorder = recorder
        self.step = recorder.step
        self.backward = recorder.learner.backward


def measure_drift(config: dict, seed: int, cache: Path | None) -> list[dict]:
    """Influence norm, float32-vs-float64 drift and J_t condition over time."""
    part = config["drift"]
    mask_seed = protocol.derive_seeds(seed)["mask"]
    out = []
    for task in part["tasks"]:
        for regime in part["regimes"]:
            for method in part["methods"]:
                out.append(
                    _drift_run(
                        config, part, task, regime, method, seed, cache, mask_seed
                    )
                )
    return out


def _drift_run(config, part, task, regime, method, seed, cache, mask_seed) -> dict:
    online = online_config(
        config,
        task,
        part["cell"],
        part["hidden_size"],
        part["steps"],
        regime=regime,
        estimator={"name": method["name"], "options": method.get("options", {})},
        optimizer=part["optimizer"],
        lr=part["lr"],
    )
    cell, readout, before, after, _ = _network(online, seed, cache)
    learner = protocol.build_learner(online, cell, mask_seed)
    every = max(int(part["steps"]) // 20, 1)  # ~20 SVDs of M_t (S x P)
    recorder = diagnostics.TrajectoryRecorder(
        learner, drift=True, influence_every=every
    )
    if regime == "end_of_segment" and bool(np.all(after.segment_end)):
        ends = np.zeros_like(after.segment_end)
        ends[part["segment_length"] - 1 :: part["segment_length"]] = True
        after = dataclasses.replace(after, segment_end=ends)

    message = None
    try:
        result = protocol.online_loop(
            online,
            cell,
            readout,
            _RecordedLearner(recorder),
            before,
            after,
            label=f"analyze {method['label']} {task} {regime}",
        )
    except Diverged as error:
        result, message = None, str(error)
    return _drift_stats(recorder, result, message, part, task, regime, method, online)


def _drift_stats(recorder, result, message, part, task, regime, method, online) -> dict:
    history = recorder.history()
    warm = int(online["run"]["pre_shift_steps"])
    drift = history["drift"][warm:, 0].numpy() if "drift" in history else np.zeros(0)
    norm = history["influence_norm"][warm:, 0].numpy()
    cond = history["jacobian_condition"][warm:, 0].double().numpy()
    points = part["curve_points"]
    entry = {
        "label": f"{method['label']} {task} {regime}",
        "method": method["label"],
        "task": task,
        "regime": regime,
        "diverged": result is None,
        "message": message,
        "final_drift": _finite_or_none(drift[-1]) if drift.size else None,
        "max_drift": _finite_or_none(np.max(drift)) if drift.size else None,
        "final_influence_norm": _finite_or_none(norm[-1]) if norm.size else None,
        "median_condition": _quantile(cond, 0.5) if cond.size else None,
        "drift_curve": _curve(drift, points),
        "influence_norm_curve": _curve(norm, points),
        "condition_curve": _curve(cond, points),
        "influence_spectrum": _influence_spectrum(history, warm),
    }
    if result is not None:
        entry.update(protocol.summarise(online, result))
        for key in ("curve_before", "curve_after", "ms_per_step"):
            entry.pop(key, None)
    return entry


def _influence_spectrum(history: dict, warm: int) -> list[dict]:
    """Per recorded step of the task-B stream: M_t's sigma_max, sigma_min, r_eff."""
    out = []
    steps = history.get("influence_steps", torch.zeros(0)).tolist()
    singular = history.get("influence_singular_values", [])
    for step, values in zip(steps, singular, strict=True):
        if step < warm:
            continue
        values = values[0].double()
        out.append(
            {
                "step": int(step - warm),
                "sigma_max": float(values[0]),
                "sigma_min": float(values[-1]),
                "effective_rank": float(diagnostics.effective_rank_of(values)),
            }
        )
    return out


# Helpers -------------------------------------------------------------------------


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _quantile(values: np.ndarray, q: float) -> float | None:
    """numpy's linear quantile, with inf (rank-deficient) as the largest value.

    None (inf) when the quantile touches an inf entry; interpolation never
    meets inf - inf (which numpy would turn into nan with a warning).
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    position = q * (ordered.size - 1)
    lo, hi = int(np.floor(position)), int(np.ceil(position))
    if not np.isfinite(ordered[hi]):
        return None
    return float(ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo]))


def _nan_stat(fn, values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return _finite_or_none(fn(values)) if values.size else None


def _curve(values: np.ndarray, points: int) -> list[float | None]:
    """Means over `points` equal windows (None where a window is not finite)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return []
    chunks = np.array_split(values, min(points, values.size))
    return [
        _finite_or_none(np.mean(c)) if np.isfinite(c).all() else None for c in chunks
    ]


# Figures -------------------------------------------------------------------------


def make_figures(summaries: list[dict], folder: Path) -> list[Path]:
    """The three analyze figures from one or more run summaries (seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, draw in zip(
        FIGURES, (_figure_condition, _figure_alignment, _figure_drift), strict=True
    ):
        fig = draw(summaries, plt)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def _entries(summaries: list[dict], part: str) -> dict[str, list[dict]]:
    """label -> that label's entries over the summaries (seeds)."""
    out: dict[str, list[dict]] = {}
    for summary in summaries:
        for entry in summary.get(part, []):
            out.setdefault(entry["label"], []).append(entry)
    return out


def _mean_of(entries: list[dict], key: str) -> float:
    values = [e[key] for e in entries if e.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def _figure_condition(summaries, plt):
    groups = _entries(summaries, "spectra")
    cells = list(dict.fromkeys(cell_label(e[0]["cell"]) for e in groups.values()))
    fig, axes = plt.subplots(
        2, max(len(cells), 1), figsize=(3.6 * max(len(cells), 1), 6.4), squeeze=False
    )
    for col, name in enumerate(cells):
        mine = [
            (e[0]["hidden_size"], e)
            for e in groups.values()
            if cell_label(e[0]["cell"]) == name
        ]
        stats = [
            {
                "med": _mean_of(e, "median_condition"),
                "q1": _mean_of(e, "q25"),
                "q3": _mean_of(e, "q75"),
                "whislo": _mean_of(e, "q05"),
                "whishi": _mean_of(e, "q95"),
                "label": f"n={n}",
            }
            for n, e in mine
        ]
        top, bottom = axes[0][col], axes[1][col]
        top.bxp(stats, showfliers=False)
        for position, box in enumerate(stats, start=1):
            if not math.isfinite(box["med"]):  # median inf: rank-deficient J_t
                top.text(
                    position,
                    C5_RANGE[1],
                    "inf\n(rank-\ndeficient)",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.axhspan(*C5_RANGE, color="tab:green", alpha=0.12, lw=0)
        top.set_title(name, fontsize=9)
        top.set_ylabel("cond(J_t) over the stream (5-95 %)")
        for n, e in mine:
            curve = np.array(e[0]["condition_curve"], dtype=float)
            bottom.plot(np.linspace(0, 1, len(curve)), curve, label=f"n={n}")
        bottom.set_xlabel("fraction of the task-B stream")
        bottom.set_ylabel("cond(J_t)")
        bottom.legend(fontsize=7)
    fig.suptitle(
        f"Condition number of J_t (green: the paper's {C5_RANGE[0]}-{C5_RANGE[1]})",
        fontsize=10,
    )
    return fig


def _figure_alignment(summaries, plt):
    groups = _entries(summaries, "alignment")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_cell: dict[str, list] = {}
    for entries in groups.values():
        first = entries[0]
        if first["num_paths"] is not None and first["policy"] == "random":
            by_cell.setdefault(
                cell_label(first["cell"], first["hidden_size"]), []
            ).append(
                (
                    first["num_paths"],
                    _mean_of(entries, "cosine_median"),
                    _mean_of(entries, "cosine_q25"),
                    _mean_of(entries, "cosine_q75"),
                )
            )
    for name, points in by_cell.items():
        k, med, lo, hi = (
            np.array(v, dtype=float) for v in zip(*sorted(points), strict=True)
        )
        left.plot(k, med, "o-", label=name)
        left.fill_between(k, lo, hi, alpha=0.2)
    left.set_xscale("symlog", linthresh=1)
    left.set_xlabel("paths per unit k (random selection)")
    left.set_ylabel("cosine to the exact gradient (median, IQR)")
    left.axhline(1.0, color="grey", lw=0.5)
    if by_cell:
        left.legend(fontsize=7)

    others = [
        (label, _mean_of(e, "cosine_median"))
        for label, e in groups.items()
        if e[0]["policy"] not in (None, "random") or e[0]["num_paths"] is None
    ]
    policy_k = [
        (label, _mean_of(e, "cosine_median"))
        for label, e in groups.items()
        if e[0]["policy"] == "random"
        and e[0]["num_paths"] is not None
        and label.endswith(" random")
    ]
    bars = policy_k + others
    if bars:
        names, values = zip(*bars, strict=True)
        right.barh(range(len(bars)), np.nan_to_num(values, nan=0.0))
        right.set_yticks(range(len(bars)), names, fontsize=7)
        for row, value in enumerate(values):
            if not math.isfinite(value):  # e.g. readout_only: no cell gradient
                right.text(0.01, row, "n/a (zero gradient)", va="center", fontsize=7)
    right.set_xlabel("median cosine to the exact gradient")
    right.set_title("selection policies and baselines", fontsize=9)
    return fig


def _figure_drift(summaries, plt):
    groups = _entries(summaries, "drift")
    tasks = list(dict.fromkeys(e[0]["task"] for e in groups.values()))
    fig, axes = plt.subplots(
        3, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 8.5), squeeze=False
    )
    rows = (
        ("influence_norm_curve", "||M_t||_F"),
        ("drift_curve", "float32 drift vs float64"),
        ("condition_curve", "cond(J_t)"),
    )
    for col, task in enumerate(tasks):
        for entries in groups.values():
            first = entries[0]
            if first["task"] != task:
                continue
            style = "-" if first["regime"] == "continuous" else "--"
            for row, (key, ylabel) in enumerate(rows):
                curve = np.array(first[key], dtype=float)
                axes[row][col].plot(
                    np.linspace(0, 1, len(curve)),
                    curve,
                    style,
                    label=f"{first['method']} ({first['regime']})",
                )
                axes[row][col].set_ylabel(ylabel)
                axes[row][col].set_yscale("log" if row < 2 else "linear")
        axes[0][col].set_title(f"task {task} (B), online adaptation", fontsize=9)
        axes[-1][col].set_xlabel("fraction of the task-B stream")
        axes[0][col].legend(fontsize=7)
    return fig


# The C5 study --------------------------------------------------------------------


def _specs(quick: bool) -> list:
    from .sweep import RunSpec

    preset = load_preset("quick" if quick else "full")
    return [RunSpec(preset["config"], seed) for seed in range(preset["seeds"])]


def _finished(summaries: dict[str, dict], specs: list) -> list[dict]:
    found = [summaries.get(spec.run_id) for spec in specs]
    return [s for s in found if s and s.get("kind") == "analyze"]


def c5_row(summaries: list[dict], n_runs: int) -> ClaimRow:
    """The C5 report row from finished analyze summaries (see the module doc)."""
    from .claims import NOT_MEASURED

    groups = _entries(summaries, "spectra")
    default = {label: e for label, e in groups.items() if e[0]["cell"] == DEFAULT_CELL}
    medians = [x["median_condition"] for e in default.values() for x in e]
    finite = [m for m in medians if m is not None]
    pooled = (
        float(np.median(finite)) if finite and len(finite) == len(medians) else None
    )
    if medians and pooled is None:
        pooled = math.inf  # a rank-deficient median: outside the range
    per_size = ", ".join(
        f"n={e[0]['hidden_size']}: {_fmt(_mean_of(e, 'median_condition'))}"
        for e in default.values()
    )
    others = "; ".join(
        f"{label}: median {_fmt(_mean_of(e, 'median_condition'))}, isotropy "
        f"{_mean_of(e, 'median_isotropy'):.2f}"
        + (
            f", rank-deficient at {sum(x['rank_deficient_steps'] for x in e)} steps"
            if any(x["rank_deficient_steps"] for x in e)
            else ""
        )
        for label, e in groups.items()
    )
    seeds = len(summaries)
    tasks = sorted({x.get("task", "") for e in groups.values() for x in e} - {""})
    spread = [
        np.median([x["median_condition"] for x in s_entries])
        for s_entries in _per_seed_default(summaries)
    ]
    verdict = verdict_range(pooled, *C5_RANGE) if medians else NOT_MEASURED
    return ClaimRow(
        claim="C5",
        statement="the recurrent Jacobian is full-rank and near-isotropic",
        paper="condition numbers 2.6-6.5",
        measured=(
            f"median cond(J_t) {_fmt(pooled)} for {cell_label(DEFAULT_CELL)}"
            f" ({per_size})"
            if medians
            else "no finished analyze run"
        ),
        n_seeds=seeds,
        ci=(
            f"per-seed medians {_fmt(min(spread))}-{_fmt(max(spread))}"
            if seeds > 1 and spread
            else "n/a (one seed)"
            if seeds
            else "n/a"
        ),
        losses="n/a (spectral diagnostic, no loss)",
        verdict=verdict,
        criterion=(
            f"median condition number of J_t in [{C5_RANGE[0]}, {C5_RANGE[1]}] "
            f"(the benchmark's default cell, pooled over sizes and seeds: median "
            f"of the per-trajectory medians)"
        ),
        notes=(
            f"{len(summaries)}/{n_runs} runs finished. Cells measured (task-B "
            f"stream of {'/'.join(tasks) or 'the task'}, the benchmark's pretrained "
            f"network run forward without learning): {others}."
        ),
        figures=list(FIGURES),
    )


def _per_seed_default(summaries: list[dict]) -> list[list[dict]]:
    out = []
    for summary in summaries:
        mine = [
            e
            for e in summary.get("spectra", [])
            if e["cell"] == DEFAULT_CELL and e["median_condition"] is not None
        ]
        if mine:
            out.append(mine)
    return out


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.3g}"


def _rows(summaries: dict[str, dict], specs: list) -> list[ClaimRow]:
    return [c5_row(_finished(summaries, specs), len(specs))]


def _figures(summaries: dict[str, dict], specs: list, folder: Path) -> list[Path]:
    finished = _finished(summaries, specs)
    return make_figures(finished, folder) if finished else []


def make_study():
    """The C5 `Study` for `experiments.studies.STUDIES`."""
    from .studies import Study

    return Study(
        name="diagnostics", claims=("C5",), specs=_specs, rows=_rows, figures=_figures
    )
