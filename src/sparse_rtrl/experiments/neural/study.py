r"""C9: an RNN decoder adapting online across recording sessions (BCI).

`run_bci(config, seed, run_dir)` (the "bci" run kind) follows the protocol of
DESIGN.md section 5 with a recording in place of a task:

1. **Data.** The sessions of `data.path` (a file or folder of FALCON M2 /
   NLB MC_Maze NWB or O'Doherty-Sabes .mat files; `loaders`) or, when the
   path is null, of the synthetic generator (`synthetic`). The source is the
   earliest session (`data.source`, default 0) and the target a later one
   (`data.target`, default -1: the latest); the target's channels are put in
   the source's order (missing ones read as zeros). The source is split in
   time: the first `1 - data.holdout` trains, the rest is held out. Inputs
   (spike counts) and targets (velocity) are z-scored per column with the
   statistics of the source training part only. With `data.lag_bins` = L the
   counts of bin t predict the velocity of bin t + L. `data.source_bins` keeps
   the source's last bins (nearest the target in time), `data.target_bins` the
   target's first.
2. **Pretrain** the cell and a linear readout by BPTT with Adam on random
   windows of the source training part (`pretrain`), cached under
   `<out>/cache/` by the hash of (data, cell, pretrain, seed), so every method
   of a seed starts from the same decoder. The held-out source loss of this
   decoder (`source_loss`) is the no-drift reference.
3. **Stream.** The last `run.pre_shift_steps` bins of the held-out source run
   forward without updates, then the target session (its first
   `data.target_bins` bins, all when null) streams with one optimizer step per
   bin, batch 1, with the method under test; "frozen" makes no update.
4. **Evaluate** `loss_all` (mean squared error over the whole target stream)
   and `loss_final` (its last 50 %).

`protocol.online_loop` runs steps 3-4, so the loop, the divergence checks and
the logging are the benchmark's own. The `C9` study runs frozen, exact RTRL,
sparse RTRL k in {0, 1, 4, 16} and (in the full reproduction) the registered
baselines over 5 seeds (3 in the quick one), and reports k=4's recovery
`(L_frozen - L_k4) / (L_frozen - L_rtrl)` of `loss_final`, with the losses,
the excess over exact RTRL, the CV of the final loss and the drift (frozen
target loss / held-out source loss). Results from the synthetic generator are
labelled synthetic in the run folder (`data.json`), the summary, the report
row and the figures.

With `optimizer.lr` null (the preset's setting) the learning rate is chosen
on the source session for exact RTRL from `protocol.LR_GRIDS`
(`select_learning_rate`, cached per data and cell) and serves every method;
the target session never informs it. The seeds vary the decoder's
initialisation, its pretraining batches and the masks; the recording (or the
synthetic recording's `data.synthetic.seed`) is the same for every seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runio
from ..claims import ClaimRow, verdict_lower_bound
from ..config import (
    CELL_KINDS,
    DTYPES,
    OPTIMIZERS,
    REFERENCE_FROZEN,
    REGIMES,
    _check_choice,
    _check_estimator,
    load_preset,
    set_dotted,
)
from ..protocol import DTYPES as TORCH_DTYPES
from ..protocol import (
    LR_GRIDS,
    _sequence_loss,
    build_cell,
    build_learner,
    derive_seeds,
    online_loop,
    summarise,
    tensor_hash,
)
from ..runner import Diverged
from ..tasks import Stream
from .loaders import load_sessions
from .synthetic import Drift, make_sessions


KIND = "bci"
PRESET = "bci"
DATA_ENV = "SPARSE_RTRL_BCI_DATA"  # the full reproduction's recording, if set
PAPER_RECOVERY = 0.80  # C9: k=4 recovers 80 +- 11 % of exact RTRL (5 seeds)
HEADLINE = "k=4"
STD_FLOOR = 1e-6  # a constant source column is centred, not scaled

DEFAULTS: dict = {
    "kind": KIND,
    "data": {
        "path": None,
        "bin_size": 0.02,
        "field": None,
        "source": 0,
        "target": -1,
        "lag_bins": 0,
        "holdout": 0.2,
        "source_bins": None,
        "target_bins": None,
        "synthetic": {
            "seed": 0,
            "num_channels": 96,
            "latent_size": 6,
            "source_bins": 4000,
            "target_bins": 2000,
            "days_between": 7,
            "drift": dataclasses.asdict(Drift()),
        },
    },
    "cell": {"kind": "LeakyRNNCell", "hidden_size": 64, "alpha": 0.2},
    "estimator": {"name": "sparse_rtrl", "options": {"num_paths": 4}},
    "optimizer": {"name": "adam", "lr": None},
    "pretrain": {
        "steps": 300,
        "batch": 16,
        "seq_len": 100,
        "washout": 10,
        "lr": 3e-3,
        "clip": 1.0,
    },
    "run": {
        "pre_shift_steps": 100,
        "dtype": "float32",
        "error_regime": "continuous",
        "readout_frozen": False,
        "log_every": 500,
        "curve_points": 60,
    },
}
FREE_FORM = ("estimator.options",)  # checked against the estimator's signature


# Config ----------------------------------------------------------------------


def resolve_bci(config: dict) -> dict:
    """Validate a (partial) "bci" config and fill every default.

    Keys are checked against `DEFAULTS` (unknown keys are listed with the
    valid ones), values against the defaults' types; null defaults take a
    value of any JSON type.
    """
    if not isinstance(config, dict):
        raise TypeError(f"run_bci: `config` expected a dict, got {config!r}.")
    kind = config.get("kind", KIND)
    if kind != KIND:
        raise ValueError(f"run_bci: config `kind` must be {KIND!r}, got {kind!r}.")
    out = _merged(DEFAULTS, config, "")
    _validate(out)
    return json.loads(json.dumps(out))


def _merged(defaults: dict, given: dict, prefix: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ValueError(
            f"run_bci: unknown config key(s) {names}; valid keys"
            f"{' of `' + prefix[:-1] + '`' if prefix else ''}: "
            f"{', '.join(sorted(defaults))}."
        )
    out = json.loads(json.dumps(defaults))
    for key, value in given.items():
        name, default = prefix + key, defaults[key]
        if isinstance(default, dict) and name not in FREE_FORM:
            if not isinstance(value, dict):
                raise TypeError(f"run_bci: `{name}` must be a section, got {value!r}.")
            out[key] = _merged(default, value, name + ".")
        else:
            out[key] = _typed(name, value, default)
    return out


def _typed(name: str, value, default):
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (isinstance(default, float) or float(value).is_integer())
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(
            f"run_bci: `{name}` expects {type(default).__name__}, got {value!r}."
        )
    return value


def _validate(config: dict) -> None:
    data = config["data"]
    _check_choice("cell.kind", config["cell"]["kind"], CELL_KINDS)
    _check_estimator(config["estimator"])
    _check_choice("optimizer.name", config["optimizer"]["name"], OPTIMIZERS)
    _check_choice("run.dtype", config["run"]["dtype"], DTYPES)
    _check_choice("run.error_regime", config["run"]["error_regime"], REGIMES)
    checks = {
        "data.bin_size": data["bin_size"] > 0,
        "data.holdout": 0 < data["holdout"] < 1,
        "data.lag_bins": data["lag_bins"] >= 0,
        "cell.hidden_size": config["cell"]["hidden_size"] > 0,
        "optimizer.lr": _optional_positive(config["optimizer"]["lr"]),
        "pretrain.steps": config["pretrain"]["steps"] >= 0,
        "pretrain.seq_len": config["pretrain"]["seq_len"]
        > config["pretrain"]["washout"],
        "run.pre_shift_steps": config["run"]["pre_shift_steps"] >= 0,
        "data.source_bins": _optional_count(data["source_bins"]),
        "data.target_bins": _optional_count(data["target_bins"]),
        "data.source": isinstance(data["source"], int),
        "data.target": isinstance(data["target"], int),
    }
    for key, ok in checks.items():
        if not ok:
            section, _, field = key.partition(".")
            raise ValueError(
                f"run_bci: `{key}` is out of range, got {config[section][field]!r} "
                "(bin_size, lr > 0; 0 < holdout < 1; lag_bins, steps >= 0; "
                "seq_len > washout; source_bins, target_bins null or ints >= 2)."
            )


def _optional_positive(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and value > 0)


def _optional_count(value) -> bool:
    return value is None or (type(value) is int and value >= 2)


# Data --------------------------------------------------------------------------


def load_pair(data: dict) -> tuple:
    """(source, target) sessions of the data config, target aligned to source."""
    if data["path"] is None:
        synth = data["synthetic"]
        sessions = make_sessions(
            2,
            num_bins=[synth["source_bins"], synth["target_bins"]],
            num_channels=synth["num_channels"],
            latent_size=synth["latent_size"],
            bin_size=data["bin_size"],
            drift=synth["drift"],
            days_between=synth["days_between"],
            seed=synth["seed"],
        )
    else:
        sessions = load_sessions(
            data["path"], bin_size=data["bin_size"], field=data["field"]
        )
    source, target = _pick(sessions, data["source"], data["target"], data["path"])
    return source, target.aligned(source.channels)


def _pick(sessions: list, source: int, target: int, path) -> tuple:
    count = len(sessions)
    if count < 2:
        raise ValueError(
            f"run_bci: `data.path` {path!r} holds {count} session; cross-session "
            "adaptation needs at least two (recordings on different days)."
        )
    for name, index in (("data.source", source), ("data.target", target)):
        if not -count <= index < count:
            raise ValueError(
                f"run_bci: `{name}` must index the {count} sessions "
                f"(-{count}..{count - 1}), got {index}."
            )
    if source % count >= target % count:
        raise ValueError(
            f"run_bci: the target session (`data.target`={target}) must come after "
            f"the source (`data.source`={source}); sessions are sorted by date."
        )
    return sessions[source], sessions[target]


def prepare_data(data: dict) -> dict:
    """Normalised arrays of the source (train, held-out) and target streams.

    Returns a dict of float64 arrays `train_x`, `train_y`, `held_x`, `held_y`,
    `target_x`, `target_y` ((T, C) and (T, D)) and `meta` (JSON-able).
    """
    source, target = load_pair(data)
    (sx, sy), (tx, ty) = (_lagged(s, data["lag_bins"]) for s in (source, target))
    sx, sy = (
        sx[-(data["source_bins"] or len(sx)) :],
        sy[-(data["source_bins"] or len(sy)) :],
    )
    tx, ty = tx[: data["target_bins"] or len(tx)], ty[: data["target_bins"] or len(ty)]
    split = int(round(len(sx) * (1 - data["holdout"])))
    if split < 2 or len(sx) - split < 1 or len(tx) < 2:
        raise ValueError(
            f"run_bci: too few bins (source {len(sx)}, target {len(tx)}) for the "
            f"holdout {data['holdout']}; use longer sessions or a larger bin."
        )

    x_mean, x_std = _moments(sx[:split])
    y_mean, y_std = _moments(sy[:split])
    meta = {
        "synthetic": source.synthetic,
        "data_kind": source.kind,
        "source": source.source,
        "target": target.source,
        "source_date": str(source.date),
        "target_date": str(target.date),
        "num_channels": source.num_channels,
        "bins": {"train": split, "held": len(sx) - split, "target": len(tx)},
    }
    return {
        "train_x": (sx[:split] - x_mean) / x_std,
        "train_y": (sy[:split] - y_mean) / y_std,
        "held_x": (sx[split:] - x_mean) / x_std,
        "held_y": (sy[split:] - y_mean) / y_std,
        "target_x": (tx - x_mean) / x_std,
        "target_y": (ty - y_mean) / y_std,
        "meta": meta,
    }


def _lagged(session, lag: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = session.spikes.astype(np.float64), session.velocity
    return (x[: len(x) - lag], y[lag:]) if lag else (x, y)


def _moments(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = array.std(axis=0)
    return array.mean(axis=0), np.where(std > STD_FLOOR, std, 1.0)


def cached_data(data: dict, cache: Path | None) -> dict:
    """`prepare_data`, computed once per output folder (the cache)."""
    if cache is None:
        return prepare_data(data)
    name = f"bci-data-{runio.config_hash(data)[:20]}.npz"
    return runio.cached(cache / name, lambda: prepare_data(data), _load_npz, _save_npz)


def _save_npz(path: Path, value: dict) -> None:
    arrays = {k: v for k, v in value.items() if k != "meta"}
    with open(path, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(value["meta"])), **arrays)


def _load_npz(path: Path) -> dict:
    with np.load(path) as archive:
        out = {k: archive[k] for k in archive.files if k != "meta"}
        out["meta"] = json.loads(str(archive["meta"]))
    return out


# Decoder ----------------------------------------------------------------------


def pretrain_decoder(config: dict, data: dict, seed: int) -> dict:
    """BPTT with Adam on random source windows; state dicts and losses."""
    cfg, seeds = config["pretrain"], derive_seeds(seed)
    cell, readout = build_decoder(config, data, seeds["init"])
    params = [*cell.parameters(), *readout.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg["lr"])
    rng = np.random.default_rng(seeds["pretrain"])
    window = min(cfg["seq_len"], len(data["train_x"]))
    losses = []
    for _ in range(cfg["steps"]):
        starts = rng.integers(0, len(data["train_x"]) - window + 1, cfg["batch"])
        rows = starts[:, None] + np.arange(window)
        batch = Stream(data["train_x"][rows], data["train_y"][rows], np.ones(window))
        loss = _sequence_loss(cell, readout, batch, min(cfg["washout"], window - 1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg["clip"])
        optimizer.step()
        losses.append(loss.item())
    held = Stream(data["held_x"][None], data["held_y"][None], np.ones(1))
    with torch.no_grad():
        held_loss = float(_sequence_loss(cell, readout, held, 0))
    tail = losses[-max(1, len(losses) // 10) :] or [math.nan]
    return {
        "cell": cell.state_dict(),
        "readout": readout.state_dict(),
        "final_loss": float(np.mean(tail)),
        "source_loss": held_loss,
    }


def build_decoder(config: dict, data: dict, init_seed: int):
    torch.manual_seed(init_seed)
    cell = build_cell(config["cell"], data["train_x"].shape[1])
    readout = nn.Linear(config["cell"]["hidden_size"], data["train_y"].shape[1])
    return cell, readout


def pretrained_decoder(config: dict, data: dict, seed: int, cache: Path | None):
    if cache is None:
        return pretrain_decoder(config, data, seed)
    key = {k: config[k] for k in ("data", "cell", "pretrain")} | {"seed": int(seed)}
    name = f"bci-decoder-{runio.config_hash(key)[:20]}.pt"
    return runio.cached(
        cache / name,
        lambda: pretrain_decoder(config, data, seed),
        lambda path: torch.load(path, weights_only=True),
        lambda path, value: torch.save(value, path),
    )


# Learning rate ----------------------------------------------------------------

LR_SELECT = {"steps": 400, "seeds": (1000, 1001)}  # seeds no run of C9 uses


def select_learning_rate(config: dict, data: dict) -> dict:
    """The grid learning rate with the lowest final loss of exact RTRL on the
    source session (task A of DESIGN.md section 5).

    As in `protocol.lr_select_loss`: the decoder starts from a fresh
    initialisation (no pretraining) and learns the first `LR_SELECT["steps"]`
    bins of the source training part online (B=1) with exact RTRL; the score
    of a rate is the mean over `LR_SELECT["seeds"]` of the loss over the last
    50 % (inf when a run diverges). The target session is never seen.

    Returns:
        {"lr": chosen rate, "scores": {rate: mean final loss}, "grid": [...]}
    """
    grid = LR_GRIDS[config["optimizer"]["name"]]
    steps = min(LR_SELECT["steps"], len(data["train_x"]))
    stream = _stream(data["train_x"][:steps], data["train_y"][:steps])
    scores = {}
    for lr in grid:
        trial = json.loads(json.dumps(config))
        trial["estimator"] = {"name": "rtrl", "options": {}}
        trial["optimizer"]["lr"] = lr
        trial["run"].update(pre_shift_steps=0, log_every=10**9)
        losses = [_selection_loss(trial, data, stream, s) for s in LR_SELECT["seeds"]]
        scores[str(lr)] = float(np.mean(losses))
    best = min(grid, key=lambda lr: scores[str(lr)])
    return {"lr": best, "scores": scores, "grid": list(grid), **LR_SELECT}


def _selection_loss(config: dict, data: dict, stream: Stream, seed: int) -> float:
    seeds = derive_seeds(seed)
    cell, readout = build_decoder(config, data, seeds["init"])
    dtype = TORCH_DTYPES[config["run"]["dtype"]]
    cell, readout = cell.to(dtype), readout.to(dtype)
    learner = build_learner(config, cell, seeds["mask"])
    try:
        result = online_loop(config, cell, readout, learner, stream, stream)
    except Diverged:
        return math.inf
    after = result["after"]
    return float(np.mean(after[len(after) // 2 :]))


def cached_learning_rate(config: dict, data: dict, cache: Path | None) -> dict:
    """`select_learning_rate`, computed once per data, cell and optimizer."""
    if cache is None:
        return select_learning_rate(config, data)
    key = {k: config[k] for k in ("data", "cell")} | {
        "optimizer": config["optimizer"]["name"],
        "dtype": config["run"]["dtype"],
        "select": LR_SELECT,
    }
    name = f"bci-lr-{runio.config_hash(key)[:20]}.json"
    return runio.cached(
        cache / name,
        lambda: select_learning_rate(config, data),
        runio.read_json,
        runio.atomic_write_json,
    )


# The run ----------------------------------------------------------------------


def method_label(config: dict) -> str:
    """ "frozen", "rtrl", "k=4" (sparse RTRL), or a baseline's registry key."""
    name, options = config["estimator"]["name"], config["estimator"]["options"]
    if name == "sparse_rtrl":
        return f"k={options.get('num_paths', 'default')}"
    return name


def run_bci(config: dict, seed: int, run_dir: Path | None = None) -> dict:
    """One (method, seed) run of the cross-session experiment (module doc)."""
    config = resolve_bci(config)
    run_dir = None if run_dir is None else Path(run_dir)
    cache = None if run_dir is None else run_dir.parent.parent / "cache"
    data = cached_data(config["data"], cache)
    if run_dir is not None:
        runio.atomic_write_json(run_dir / "data.json", data["meta"])

    selection = None
    if config["optimizer"]["lr"] is None:
        selection = cached_learning_rate(config, data, cache)
        config["optimizer"]["lr"] = selection["lr"]
    net = pretrained_decoder(config, data, seed, cache)
    cell, readout = build_decoder(config, data, derive_seeds(seed)["init"])
    cell.load_state_dict(net["cell"])
    readout.load_state_dict(net["readout"])
    dtype = TORCH_DTYPES[config["run"]["dtype"]]
    cell, readout = cell.to(dtype), readout.to(dtype)
    weights = [*cell.state_dict().values(), *readout.state_dict().values()]
    pretrained_hash = tensor_hash(weights)

    pre = config["run"]["pre_shift_steps"]
    before = _stream(data["held_x"][-max(pre, 1) :], data["held_y"][-max(pre, 1) :])
    after = _stream(data["target_x"], data["target_y"])
    learner = build_learner(config, cell, derive_seeds(seed)["mask"])
    label = f"bci {method_label(config)} s{seed}"
    metrics = None if run_dir is None else run_dir / "metrics.jsonl"
    result = online_loop(
        config, cell, readout, learner, before, after, label=label, metrics_path=metrics
    )

    summary = summarise(config, result)
    summary.update(
        method=method_label(config),
        lr=config["optimizer"]["lr"],
        lr_selection=selection,
        seed=int(seed),
        synthetic=bool(data["meta"]["synthetic"]),
        data=data["meta"],
        source_loss=net["source_loss"],
        pretrain_loss=net["final_loss"],
        pretrained_hash=pretrained_hash,
        stream_hash=tensor_hash([after.inputs, after.targets]),
    )
    return summary


def _stream(x: np.ndarray, y: np.ndarray) -> Stream:
    return Stream(x[None], y[None], np.ones(len(x), dtype=bool))


# The study --------------------------------------------------------------------


def study_configs(quick: bool, overrides: dict | None = None) -> list[tuple]:
    """(label, resolved config, seed) of the C9 study's runs.

    The preset `presets/bci.json` gives the methods and the sizes of each
    mode; variants marked `"modes": ["full"]` (the baselines) run in the full
    reproduction only. With the environment variable SPARSE_RTRL_BCI_DATA set
    to a recording path, the full reproduction reads it instead of the
    synthetic generator.
    """
    preset = load_preset(PRESET)
    mode = "quick" if quick else "full"
    mode_set = preset.get("modes", {}).get(mode, {})
    settings = dict(mode_set.get("set", {}))
    if not quick and os.environ.get(DATA_ENV):
        settings["data.path"] = os.environ[DATA_ENV]
    settings.update(overrides or {})
    out = []
    for variant in preset["variants"]:
        if mode not in variant.get("modes", (mode,)) or _skipped(variant):
            continue
        config = json.loads(json.dumps(preset["base"]))
        for key, value in {**settings, **variant.get("set", {})}.items():
            set_dotted(config, key, value)
        config = resolve_bci(config)
        out += [(variant["label"], config, s) for s in range(mode_set.get("seeds", 5))]
    return out


def _skipped(variant: dict) -> bool:
    from ...estimators import ESTIMATORS

    name = variant.get("set", {}).get("estimator.name")
    return name not in (None, REFERENCE_FROZEN) and name not in ESTIMATORS


def study_specs(quick: bool) -> list:
    from ..sweep import RunSpec

    return [RunSpec(config, seed) for _, config, seed in study_configs(quick)]


def collect_losses(summaries: dict, specs: list) -> dict:
    """method -> seed -> summary (a failed run's record included)."""
    out: dict[str, dict[int, dict]] = {}
    for spec in specs:
        if spec.config.get("kind") != KIND or spec.run_id not in summaries:
            continue
        out.setdefault(method_label(spec.config), {})[spec.seed] = summaries[
            spec.run_id
        ]
    return out


def is_synthetic(specs: list) -> bool:
    """True when any run of the study reads the synthetic generator."""
    return any(
        spec.config.get("kind") == KIND and spec.config["data"]["path"] is None
        for spec in specs
    )


def recoveries(by_method: dict, method: str) -> list[float | None]:
    """Per-seed recovery of `method` (None: n/a or a diverged reference)."""
    from .. import stats

    out = []
    for seed, summary in sorted(by_method.get(method, {}).items()):
        frozen = by_method.get(REFERENCE_FROZEN, {}).get(seed, {})
        full = by_method.get("rtrl", {}).get(seed, {})
        losses = [s.get("loss_final") for s in (frozen, summary, full)]
        if any(_failed(s) for s in (frozen, summary, full)) or None in losses:
            out.append(None)
            continue
        out.append(stats.recovery(*losses))
    return out


def _failed(summary: dict) -> bool:
    return bool(summary.get("diverged")) or "loss_final" not in summary


def study_rows(summaries: dict, specs: list) -> list[ClaimRow]:
    """The C9 row: k=4's recovery, with every method's losses in the notes."""
    from .. import stats

    by_method = collect_losses(summaries, specs)
    if not by_method:
        return []
    values = [v for v in recoveries(by_method, HEADLINE) if v is not None]
    runs = by_method.get(HEADLINE, {})
    ci = stats.bootstrap_ci(values) if len(values) >= 2 else None
    mean = float(np.mean(values)) if values else None
    synthetic = is_synthetic(specs)
    return [
        ClaimRow(
            claim="C9",
            statement=(
                "cross-session electrode drift, k=4 of n recovers most of exact "
                f"RTRL's adaptation ({'SYNTHETIC' if synthetic else 'REAL'} data)"
            ),
            paper="80 ± 11 % (5 seeds, real primate data)",
            measured=_recovery_text(values, runs),
            n_seeds=len(runs),
            ci=stats.fmt_ci(ci, percent=True),
            losses=_losses_text(by_method),
            verdict=verdict_lower_bound(ci, PAPER_RECOVERY, mean),
            criterion="recovery CI lower bound > 50 %",
            notes=_notes(by_method, synthetic),
            synthetic=synthetic,
            figures=[figure_name(synthetic)],
        )
    ]


def _recovery_text(values: list[float], runs: dict) -> str:
    from .. import stats

    diverged = sum(bool(s.get("diverged")) for s in runs.values())
    failed = sum(_failed(s) for s in runs.values()) - diverged
    text = stats.fmt_mean_std(values, percent=True) if values else "n/a"
    missing = len(runs) - len(values) - diverged - failed
    if missing > 0:
        text += f" ({missing}/{len(runs)} seeds n/a: no frozen-full gap)"
    text += f", {diverged}/{len(runs)} diverged" if diverged else ""
    return text + (f", {failed}/{len(runs)} failed" if failed else "")


def _mean_final(runs: dict) -> float | None:
    finals = [s["loss_final"] for s in runs.values() if not _failed(s)]
    return float(np.mean(finals)) if finals else None


def _losses_text(by_method: dict) -> str:
    """Mean final loss per method, and its excess over exact RTRL.

    The excess L_method / L_rtrl - 1 is taken per seed, then averaged over
    the seeds where both runs finished.
    """
    full = by_method.get("rtrl", {})
    parts = []
    for method in _ordered(by_method):
        runs = by_method[method]
        loss = _mean_final(runs)
        if loss is None:
            parts.append(f"{method} no finished run")
            continue
        ratios = [
            runs[seed]["loss_final"] / full[seed]["loss_final"] - 1
            for seed in runs
            if seed in full and not _failed(runs[seed]) and not _failed(full[seed])
        ]
        excess = f" ({np.mean(ratios):+.0%})" if ratios and method != "rtrl" else ""
        parts.append(f"{method} {loss:.3f}{excess}")
    return "; ".join(parts)


def _notes(by_method: dict, synthetic: bool) -> str:
    from .. import stats

    parts = ["SYNTHETIC recording (synthetic generator)" if synthetic else "real data"]
    for method in _ordered(by_method):
        if method in (REFERENCE_FROZEN, "rtrl"):
            continue
        values = [v for v in recoveries(by_method, method) if v is not None]
        if values:
            parts.append(f"recovery {method} {stats.fmt_mean_std(values, True)}")
    finals = {
        m: [s["loss_final"] for s in runs.values() if not _failed(s)]
        for m, runs in by_method.items()
    }
    for method in (HEADLINE, "rtrl"):
        if len(finals.get(method, [])) >= 2:
            parts.append(f"CV {method} {stats.cv(finals[method]):.1%}")
    drift = _drift(by_method)
    if drift is not None:
        parts.append(f"drift: frozen target loss / source held-out loss {drift:.2f}")
    return "; ".join(parts)


def _drift(by_method: dict) -> float | None:
    runs = [s for s in by_method.get(REFERENCE_FROZEN, {}).values() if not _failed(s)]
    if not runs:
        return None
    return float(np.mean([s["loss_all"] / s["source_loss"] for s in runs]))


def _ordered(by_method: dict) -> list[str]:
    first = [REFERENCE_FROZEN, "rtrl", "k=0", "k=1", "k=4", "k=16"]
    return [m for m in first if m in by_method] + sorted(
        m for m in by_method if m not in first
    )


def figure_name(synthetic: bool) -> str:
    return "c9_bci_synthetic.png" if synthetic else "c9_bci.png"


def study_figures(summaries: dict, specs: list, folder: Path) -> list[Path]:
    """Running mean of the target-stream loss per method, and each method's
    recovery (mean ± std over seeds); titled with the data's label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = collect_losses(summaries, specs)
    curves = {
        method: [s["curve_after"] for s in by_method[method].values() if not _failed(s)]
        for method in _ordered(by_method)
    }
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return []

    synthetic = is_synthetic(specs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, runs in curves.items():
        mean = np.nanmean(np.array(runs, dtype=float), axis=0)
        left.plot(np.cumsum(mean) / np.arange(1, len(mean) + 1), label=method)
    left.set(
        xlabel="target stream (equal windows)",
        ylabel="running mean MSE (source-normalised velocity)",
    )
    left.legend(fontsize=7)
    _recovery_bars(right, by_method)
    label = "SYNTHETIC data" if synthetic else "real data"
    fig.suptitle(f"C9: online adaptation to a later recording session ({label})")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / figure_name(synthetic)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _recovery_bars(ax, by_method: dict) -> None:
    methods, means, stds = [], [], []
    for method in _ordered(by_method):
        values = [v for v in recoveries(by_method, method) if v is not None]
        if method not in (REFERENCE_FROZEN, "rtrl") and values:
            methods.append(method)
            means.append(np.mean(values))
            stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    ax.bar(methods, means, yerr=stds, capsize=3, color="tab:purple")
    ax.axhline(1.0, color="k", lw=0.8, label="exact RTRL")
    ax.axhline(PAPER_RECOVERY, color="tab:red", ls="--", lw=0.8, label="paper k=4")
    ax.set(ylabel="recovery of the final loss", xlabel="method")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=7)


def make_study():
    """The C9 `Study` for `studies.STUDIES`."""
    from ..studies import Study

    return Study(
        name="bci",
        claims=("C9",),
        specs=study_specs,
        rows=study_rows,
        figures=study_figures,
    )


__all__ = [
    "DEFAULTS",
    "make_study",
    "prepare_data",
    "resolve_bci",
    "run_bci",
]
