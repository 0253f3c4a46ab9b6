r"""The online-adaptation protocol of DESIGN.md section 5, one run at a time.

`run_online(config, seed, run_dir)` (the "online" run kind):

1. **Seeds.** `numpy.random.SeedSequence(seed).spawn(4)` gives the seeds of
   the initialisation, the streams, the masks and the pretraining, so every
   method of a seed shares all of them.
2. **Pretrain** the cell and a linear readout on task A by offline BPTT with
   Adam (`PretrainConfig`), cached under `<out>/cache/` by the hash of (task,
   cell, pretrain settings, seed): every method of a seed loads the same net.
3. **Stream.** `pre_shift_steps` of task A (forward only, no updates: the
   state and the estimator's influence warm up identically for every method),
   then `adapt_steps` of task B, drawn from the stream seed.
4. **Adapt** online with batch 1: per step `h = learner.step(x)`, the loss of
   `readout(h)`, `learner.backward(loss)`, one optimizer step. In the
   end-of-segment regime the optimizer steps only where an error exists. The
   "frozen" reference runs the same pipeline without any update.
5. **Evaluate** the mean loss over the whole B stream (`loss_all`) and over its
   last 50 % (`loss_final`, the headline); for the adding task only segment
   ends count.

Runs use one torch thread (`SPARSE_RTRL_THREADS` changes it): with several
runs per core, torch's intra-op threads oversubscribe the machine and slowed
pretraining 50-fold in our measurements.

A non-finite loss or state raises `runner.Diverged` naming the step and what
blew up. Every `log_every` steps one fixed-format line goes to the logger
"sparse_rtrl.experiments" and one record to `metrics.jsonl`.
"""

import hashlib
import inspect
import itertools
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cells import LeakyRNNCell, adapt
from ..estimators import make_estimator
from . import checkpoint, runio
from .config import ALL_PATHS, REFERENCE_FROZEN, method_label, resolve
from .runner import Diverged
from .tasks import Stream, make_task


LOG = logging.getLogger("sparse_rtrl.experiments")
LOG_LINE = "{label} step {step:>7d}/{total} loss {loss:.4e} ms/step {ms:7.2f}"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# Seeds -------------------------------------------------------------------


def derive_seeds(seed: int) -> dict[str, int]:
    """The init, stream, mask and pretrain seeds of a run seed (SeedSequence)."""
    children = np.random.SeedSequence(int(seed)).spawn(4)
    names = ("init", "stream", "mask", "pretrain")
    return {
        n: int(c.generate_state(1, np.uint64)[0] >> 1)
        for n, c in zip(names, children, strict=True)
    }


# Networks ----------------------------------------------------------------


def build_cell(cell_cfg: dict, input_size: int) -> nn.Module:
    """The configured cell (float32; cast later)."""
    kind, size = cell_cfg["kind"], cell_cfg["hidden_size"]
    if kind == "LeakyRNNCell":
        return LeakyRNNCell(input_size, size, alpha=cell_cfg["alpha"])
    return getattr(nn, kind)(input_size, size)


def build_network(config: dict, init_seed: int) -> tuple[nn.Module, nn.Linear]:
    """A fresh cell and readout from the init seed."""
    task = make_task(config["task"]["name"], **config["task"]["options"])
    torch.manual_seed(init_seed)
    cell = build_cell(config["cell"], task.input_size)
    readout = nn.Linear(config["cell"]["hidden_size"], task.output_size)
    return cell, readout


def _cell_forward(cell: nn.Module, x: torch.Tensor, state):
    if isinstance(cell, nn.LSTMCell):
        return cell(x, state)
    return cell(x, state)


def _hidden(cell: nn.Module, state) -> torch.Tensor:
    return state[0] if isinstance(cell, nn.LSTMCell) else state


def _sequence_loss(cell, readout, stream: Stream, washout: int) -> torch.Tensor:
    """Mean squared error of a batch of task-A sequences (BPTT through all)."""
    inputs = torch.as_tensor(stream.inputs, dtype=torch.float32)
    targets = torch.as_tensor(stream.targets, dtype=torch.float32)
    state, outputs = None, []
    for t in range(inputs.shape[1]):
        state = _cell_forward(cell, inputs[:, t], state)
        outputs.append(readout(_hidden(cell, state)))
    pred = torch.stack(outputs, dim=1)[:, washout:]
    return ((pred - targets[:, washout:]) ** 2).mean()


def pretrain(config: dict, seeds: dict[str, int]) -> dict:
    """Offline BPTT with Adam on task A; returns the state dicts and the loss."""
    cfg = config["pretrain"]
    task = make_task(config["task"]["name"], **config["task"]["options"])
    cell, readout = build_network(config, seeds["init"])
    params = [*cell.parameters(), *readout.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg["lr"])
    rng = np.random.default_rng(seeds["pretrain"])
    losses = []
    for _ in range(cfg["steps"]):
        batch = task.sample("A", cfg["seq_len"], rng, cfg["batch"])
        loss = _sequence_loss(cell, readout, batch, cfg["washout"])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg["clip"])
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10) :] if losses else [math.nan]
    return {
        "cell": cell.state_dict(),
        "readout": readout.state_dict(),
        "final_loss": float(np.mean(tail)),
    }


def pretrain_key(config: dict, seed: int) -> dict:
    """What the pretrained network depends on (its cache identity)."""
    return {
        "task": config["task"],
        "cell": config["cell"],
        "pretrain": config["pretrain"],
        "seed": int(seed),
    }


def pretrained(config: dict, seed: int, cache_dir: Path | None) -> dict:
    """The pretrained network of (config, seed), computed once per cache."""
    seeds = derive_seeds(seed)
    if cache_dir is None:
        return pretrain(config, seeds)
    name = f"pretrain-{runio.config_hash(pretrain_key(config, seed))[:20]}.pt"
    return runio.cached(
        Path(cache_dir) / name,
        lambda: pretrain(config, seeds),
        lambda path: torch.load(path, weights_only=True),
        lambda path, value: torch.save(value, path),
    )


def tensor_hash(tensors) -> str:
    """sha256 of the raw bytes of a sequence of tensors / arrays."""
    digest = hashlib.sha256()
    for item in tensors:
        array = item.detach().cpu().numpy() if torch.is_tensor(item) else item
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# The stream ---------------------------------------------------------------


def adaptation_stream(config: dict, seed: int) -> tuple[Stream, Stream]:
    """(pre-shift task-A stream, task-B stream) of a run seed, one stream each."""
    task = make_task(config["task"]["name"], **config["task"]["options"])
    rng = np.random.default_rng(derive_seeds(seed)["stream"])
    run = config["run"]
    before = task.sample("A", max(run["pre_shift_steps"], 1), rng)
    after = task.sample("B", run["adapt_steps"], rng)
    return before, after


# The learner ---------------------------------------------------------------


class FrozenLearner:
    """The no-update reference: the cell run forward with the adapter only."""

    def __init__(self, cell: nn.Module) -> None:
        self.adapter = adapt(cell)
        self.state = None

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state = self.adapter.initial_state(x.shape[0])
        with torch.no_grad():
            self.state = self.adapter.step(x, self.state, jacobian=False).state
        return self.adapter.hidden(self.state)

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - unused
        raise RuntimeError("FrozenLearner never learns.")

    def state_dict(self) -> dict:
        return {"state": None if self.state is None else self.state.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = state_dict["state"]


def state_size(cell: nn.Module) -> int:
    return 2 * cell.hidden_size if isinstance(cell, nn.LSTMCell) else cell.hidden_size


def build_learner(config: dict, cell: nn.Module, mask_seed: int):
    """The estimator of the config around `cell` (or the frozen reference)."""
    name = config["estimator"]["name"]
    if name == REFERENCE_FROZEN:
        return FrozenLearner(cell)
    options = dict(config["estimator"]["options"])
    if options.get("num_paths") == ALL_PATHS:
        options["num_paths"] = state_size(cell)
    from ..estimators import get_estimator

    params = inspect.signature(get_estimator(name).__init__).parameters
    if "generator" in params:
        options["generator"] = mask_seed
    return make_estimator(name, cell, **options)


def build_optimizer(config: dict, params: list) -> torch.optim.Optimizer:
    cfg = config["optimizer"]
    classes = {
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
    }
    return classes[cfg["name"]](params, lr=cfg["lr"])


# The online loop -----------------------------------------------------------


def _guard(run: dict) -> checkpoint.DivergenceGuard:
    """The run's divergence guard (defaults for configs without the keys)."""
    return checkpoint.DivergenceGuard(
        check_every=run.get("check_every", 50),
        max_loss=run.get("max_loss", 1e6),
        max_norm=run.get("max_norm", 1e8),
    )


def online_loop(
    config,
    cell,
    readout,
    learner,
    before,
    after,
    *,
    label="run",
    metrics_path=None,
    checkpoint_path=None,
    config_hash=None,
) -> dict:
    """Run the pre-shift warm-up and the adaptation; return per-step losses.

    With `checkpoint_path`, everything the rest of the stream depends on is
    saved there every `run.checkpoint_every` steps and on SIGINT/SIGTERM
    (which then raises `checkpoint.Interrupted`); a checkpoint found there
    (written for `config_hash`) is resumed from, giving the same numbers as
    an uninterrupted run. The divergence guard raises `runner.Diverged`.

    Returns:
        dict with "before" (T_A,) and "after" (T_B,) float64 arrays of the
        per-step loss (NaN where the loss is not evaluated), and "ms_per_step".
    """
    run = config["run"]
    dtype = DTYPES[run["dtype"]]
    learn = config["estimator"]["name"] != REFERENCE_FROZEN
    params = [*cell.parameters()] + (
        [] if run["readout_frozen"] else [*readout.parameters()]
    )
    for p in readout.parameters():
        p.requires_grad_(not run["readout_frozen"])
    optimizer = build_optimizer(config, params) if learn else None
    end_only = run["error_regime"] == "end_of_segment"
    guard = _guard(run)
    save_every = run.get("checkpoint_every", 0) if checkpoint_path else 0
    stop_at = checkpoint.interrupt_hook()
    phases = [(before, False)] if run["pre_shift_steps"] > 0 else []
    phases.append((after, True))
    losses = [np.full(len(stream.inputs[0]), np.nan) for stream, _ in phases]
    total = sum(len(x) for x in losses)
    nets = {
        "cell": cell,
        "readout": readout,
        "learner": learner,
        "optimizer": optimizer,
    }
    position, window = 0, []
    if checkpoint_path is not None:
        saved = checkpoint.load(checkpoint_path, config_hash=config_hash)
        if saved is not None:
            position, window = _restore(saved, nets, losses)

    def save(at: int) -> None:
        checkpoint.save(
            checkpoint_path, _snapshot(at, window, losses, nets, config_hash)
        )

    start = time.perf_counter()
    with checkpoint.InterruptGuard() as interrupt:
        tick, offset = time.perf_counter(), 0
        for (stream, update), phase_losses in zip(phases, losses, strict=True):
            inputs = torch.as_tensor(stream.inputs[0], dtype=dtype)
            targets = torch.as_tensor(stream.targets[0], dtype=dtype)
            evaluate = stream.segment_end if stream.evaluate_at_segment_end else None
            for t in range(max(position - offset, 0), len(inputs)):
                step = offset + t
                hidden = learner.step(inputs[t : t + 1])
                loss = ((readout(hidden)[0] - targets[t]) ** 2).mean()
                value = loss.item()
                guard.check_loss(step, value)
                if guard.due(step):
                    tensors = checkpoint.learner_tensors(learner)
                    guard.check_tensors(step, {"hidden state": hidden, **tensors})
                if evaluate is None or evaluate[t]:
                    phase_losses[t] = value
                    window.append(value)
                if update and learn and (not end_only or stream.segment_end[t]):
                    learner.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if (step + 1) % run["log_every"] == 0:
                    ms = 1000 * (time.perf_counter() - tick) / run["log_every"]
                    _log(label, step + 1, total, window, ms, metrics_path)
                    window, tick = [], time.perf_counter()
                if interrupt.requested or step + 1 == stop_at:
                    if checkpoint_path is not None:
                        save(step + 1)
                    raise checkpoint.Interrupted(
                        f"{label}: interrupted after step {step + 1} "
                        f"({interrupt.requested or 'test hook'}); resume with "
                        "`sparse-rtrl run ... --resume`."
                    )
                if save_every and (step + 1) % save_every == 0 and step + 1 < total:
                    save(step + 1)
            offset += len(inputs)
    elapsed = time.perf_counter() - start
    pre = losses[0] if len(phases) == 2 else np.zeros(0)
    return {
        "before": pre,
        "after": losses[-1],
        "ms_per_step": 1000 * elapsed / max(total - position, 1),
    }


def _snapshot(position, window, losses, nets, config_hash) -> dict:
    """What a checkpoint holds (tensors cloned by `state_dict`)."""
    out = {
        "config_hash": config_hash,
        "position": position,
        "window": list(window),
        "losses": [x.copy() for x in losses],
    }
    for name, obj in nets.items():
        if obj is not None:
            out[name] = obj.state_dict()
    return out


def _restore(saved, nets, losses) -> tuple[int, list]:
    """Load a checkpoint into the networks, learner, optimizer and losses."""
    for name, obj in nets.items():
        if obj is not None:
            obj.load_state_dict(saved[name])
    for target, source in zip(losses, saved["losses"], strict=True):
        target[:] = source
    return int(saved["position"]), list(saved["window"])


def _log(label, step, total, window, ms, metrics_path) -> None:
    loss = float(np.mean(window)) if window else math.nan
    LOG.info(LOG_LINE.format(label=label, step=step, total=total, loss=loss, ms=ms))
    if metrics_path is not None:
        runio.append_jsonl(
            metrics_path, {"step": step, "loss": loss, "ms_per_step": ms}
        )


def _nanmean(values: np.ndarray) -> float:
    """Mean of the evaluated (non-NaN) steps; NaN when there are none."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def curve(losses: np.ndarray, points: int) -> list[float]:
    """Mean loss in `points` equal windows (NaN-aware), for the figures."""
    if len(losses) == 0:
        return []
    chunks = np.array_split(losses, min(points, len(losses)))
    return [_nanmean(c) if np.isfinite(c).any() else None for c in chunks]


def summarise(config: dict, result: dict) -> dict:
    """loss_all (whole B stream) and loss_final (its last 50 %)."""
    after = result["after"]
    half = len(after) // 2
    points = config["run"]["curve_points"]
    return {
        "loss_all": _nanmean(after),
        "loss_final": _nanmean(after[half:]),
        "loss_before": _nanmean(result["before"]) if len(result["before"]) else None,
        "diverged": False,
        "ms_per_step": result["ms_per_step"],
        "curve_before": curve(result["before"], max(points // 6, 1)),
        "curve_after": curve(after, points),
    }


def prepare(config: dict, seed: int, cache_dir: Path | None):
    """Pretrained cell and readout in the run dtype, and the two streams."""
    seeds = derive_seeds(seed)
    net = pretrained(config, seed, cache_dir)
    cell, readout = build_network(config, seeds["init"])
    cell.load_state_dict(net["cell"])
    readout.load_state_dict(net["readout"])
    dtype = DTYPES[config["run"]["dtype"]]
    cell, readout = cell.to(dtype), readout.to(dtype)
    before, after = adaptation_stream(config, seed)
    return cell, readout, before, after, net


def run_online(config: dict, seed: int, run_dir: Path | None = None) -> dict:
    """One run of the protocol (see the module docstring); returns its summary."""
    config = resolve(config)
    torch.set_num_threads(int(os.environ.get("SPARSE_RTRL_THREADS", "1")))
    run_dir = None if run_dir is None else Path(run_dir)
    cache = None if run_dir is None else run_dir.parent.parent / "cache"
    cell, readout, before, after, net = prepare(config, seed, cache)
    weights_hash = tensor_hash(
        [*cell.state_dict().values(), *readout.state_dict().values()]
    )
    stream_hash = tensor_hash([after.inputs, after.targets])

    learner = build_learner(config, cell, derive_seeds(seed)["mask"])
    label = f"{config['task']['name']} {method_label(config['estimator'])} s{seed}"
    metrics = None if run_dir is None else run_dir / "metrics.jsonl"
    saved = None if run_dir is None else run_dir / checkpoint.CHECKPOINT_NAME
    if saved is not None and saved.exists() and not checkpoint.resume_enabled():
        saved.unlink()  # an interrupted earlier attempt: start over
    identity = runio.config_hash({"config": config, "seed": int(seed)})
    result = online_loop(
        config,
        cell,
        readout,
        learner,
        before,
        after,
        label=label,
        metrics_path=metrics,
        checkpoint_path=saved,
        config_hash=identity,
    )
    if saved is not None and saved.exists():
        saved.unlink()  # finished: the summary is the result
    summary = summarise(config, result)
    summary.update(
        pretrain_loss=net["final_loss"],
        pretrained_hash=weights_hash,
        stream_hash=stream_hash,
        seed=int(seed),
    )
    return summary


# Learning-rate selection ----------------------------------------------------

LR_GRIDS = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "rmsprop": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}
LR_SELECT = {"steps": 600, "seeds": (1000, 1001)}


def lr_select_sizes() -> dict[tuple[str, str], tuple[int, ...]]:
    """{(task, optimizer): hidden sizes} over the default config and every
    online run of every study, quick and full, whose learning rate comes from
    the table: a rate is chosen for every size it will serve."""
    from .config import default_lr
    from .reproduce import collect_specs

    configs = [resolve({})]
    for quick in (True, False):
        configs += [s.config for v in collect_specs(quick).values() for s in v]
    sizes: dict[tuple[str, str], set] = {}
    for config in configs:
        if config.get("kind", "online") != "online":
            continue
        key = (config["task"]["name"], config["optimizer"]["name"])
        if config["optimizer"]["lr"] != default_lr(*key):
            continue  # the study sets its own rate
        sizes.setdefault(key, set()).add(config["cell"]["hidden_size"])
    return {key: tuple(sorted(v)) for key, v in sorted(sizes.items())}


def lr_select_loss(
    task: str, optimizer: str, lr: float, seed: int, hidden_size: int
) -> float:
    """Final online loss of exact RTRL learning task A from a fresh init.

    No pretraining: a `LeakyRNNCell(alpha=0.2)` of `hidden_size` units starts at
    its initialisation and learns task A online (B=1, one step per time step,
    float32) for `LR_SELECT["steps"]` steps; the mean loss over the last 50 %
    is returned (inf if the run diverged).
    """
    config = resolve(
        {
            "task": {"name": task},
            "cell": {"hidden_size": hidden_size},
            "estimator": {"name": "rtrl"},
            "optimizer": {"name": optimizer, "lr": lr},
            "run": {
                "adapt_steps": LR_SELECT["steps"],
                "pre_shift_steps": 0,
                "log_every": 10**9,
            },
        }
    )
    seeds = derive_seeds(seed)
    cell, readout = build_network(config, seeds["init"])
    task_obj = make_task(task)
    stream = task_obj.sample(
        "A", LR_SELECT["steps"], np.random.default_rng(seeds["stream"])
    )
    learner = build_learner(config, cell, seeds["mask"])
    try:
        result = online_loop(config, cell, readout, learner, stream, stream)
    except Diverged:
        return math.inf
    after = result["after"]
    loss = _nanmean(after[len(after) // 2 :])
    return loss if math.isfinite(loss) else math.inf


def choose_learning_rates(sizes: dict | None = None, starmap=None) -> dict:
    """The learning-rate table: for each task x optimizer, the grid value whose
    worst size does best.

    For every hidden size the studies run the pair at (`lr_select_sizes`), the
    score of a rate at that size is the mean final loss of exact RTRL on task A
    over seeds 1000 and 1001 (never used by the benchmark); the chosen rate has
    the lowest maximum score over the sizes, so that one rate serves every size
    without destabilising the largest. `starmap` (e.g. a process pool's) runs
    the trials; by default they run here one after another. Writes nothing;
    paste the result into `presets/learning_rates.json`.
    """
    sizes = lr_select_sizes() if sizes is None else sizes
    trials = [
        (task, opt, lr, seed, n)
        for (task, opt), ns in sizes.items()
        for lr in LR_GRIDS[opt]
        for n in ns
        for seed in LR_SELECT["seeds"]
    ]
    if starmap is None:
        torch.set_num_threads(1)
        starmap = itertools.starmap
    loss = dict(zip(trials, starmap(lr_select_loss, trials), strict=True))
    table, losses = {}, {}
    for (task, opt), ns in sizes.items():
        score = {
            lr: {
                n: float(
                    np.mean([loss[task, opt, lr, s, n] for s in LR_SELECT["seeds"]])
                )
                for n in ns
            }
            for lr in LR_GRIDS[opt]
        }
        worst = {lr: max(by_size.values()) for lr, by_size in score.items()}
        table.setdefault(task, {})[opt] = min(worst, key=worst.get)
        losses.setdefault(task, {})[opt] = {
            str(lr): {str(n): round(v, 4) for n, v in by_size.items()}
            for lr, by_size in score.items()
        }
    return {
        "chosen": table,
        "final_losses": losses,
        "grid": LR_GRIDS,
        "sizes": {f"{t}/{o}": list(ns) for (t, o), ns in sizes.items()},
        **LR_SELECT,
    }
