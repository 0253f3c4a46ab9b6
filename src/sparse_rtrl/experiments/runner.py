"""Dispatch one run of a sweep to the function of its kind.

`run_one(config, seed, run_dir)` is the sweep's default `run_fn`: it looks up
`config["kind"]` in `RUN_KINDS` ("kind" -> "module:function"), imports the
function and calls it with the same arguments. Each study helper adds its own
line to `RUN_KINDS`; the function returns a JSON-serialisable summary with at
least `loss_all`, `loss_final` and `diverged`.
"""

import importlib
from pathlib import Path
from typing import Any


RUN_KINDS: dict[str, str] = {
    "online": "sparse_rtrl.experiments.protocol:run_online",
    "bci": "sparse_rtrl.experiments.neural.study:run_bci",
    "transformer": "sparse_rtrl.experiments.transformer_study:run_transformer",
    "analyze": "sparse_rtrl.experiments.analyze:run_analyze",
}


class Diverged(RuntimeError):
    """A run produced a non-finite loss or state; the message says where."""


def resolve_kind(kind: str) -> Any:
    """The run function registered for `kind`."""
    try:
        target = RUN_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"run_one: unknown config `kind` {kind!r}; expected one of "
            f"{', '.join(sorted(RUN_KINDS))}."
        ) from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_one(config: dict, seed: int, run_dir: Path) -> dict:
    """Run one (config, seed) in `run_dir` and return its summary."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(
            "run_one: `config` must be a dict with a 'kind' key, got "
            f"{type(config).__name__} with keys {sorted(config)[:8]}."
        )
    return resolve_kind(config["kind"])(config, seed, Path(run_dir))
