r"""Run configurations: small frozen dataclasses per component, composed.

A run config is a JSON-able dict with one section per component:

    {"kind": "online",
     "task": TaskConfig, "cell": CellConfig, "estimator": EstimatorConfig,
     "optimizer": OptimizerConfig, "pretrain": PretrainConfig, "run": RunConfig}

`resolve(config)` validates a partial config, fills every default and returns
the complete dict (the run's identity is the hash of that dict plus its seed).
A learning rate left as None is filled from the table of `presets/
learning_rates.json` (one per task x optimizer, chosen on task A for exact
RTRL; see `protocol.run_lr_select`). `apply_overrides(config, ["a.b=v"])`
applies command-line `--set` overrides, type-checked against the defaults;
unknown keys are listed with the valid ones.

Presets (experiment files shipped in `presets/`, read with importlib.resources)
hold a `base` config, `axes` (products of values, per mode), `variants`
(labelled override sets: the methods and references) and per-mode `seeds`
and `set` (the sizes of the quick and full reproductions); `expand_preset`
turns one into (label, resolved config, seed) triples.
"""

import dataclasses
import difflib
import inspect
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .tasks import TASKS


CELL_KINDS = ("LeakyRNNCell", "RNNCell", "GRUCell", "LSTMCell")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
DTYPES = ("float32", "float64")
REGIMES = ("continuous", "end_of_segment")
REFERENCE_FROZEN = "frozen"  # the no-update reference (not a registry key)
ALL_PATHS = "all"  # num_paths = S (every path: exact, through the sparse code)


@dataclass(frozen=True)
class TaskConfig:
    """The task (see `tasks.TASKS`) and its keyword options."""

    name: str = "sine"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CellConfig:
    """The recurrent cell. `alpha` is used by LeakyRNNCell only."""

    kind: str = "LeakyRNNCell"
    hidden_size: int = 64
    alpha: float = 0.2


@dataclass(frozen=True)
class EstimatorConfig:
    """An estimator registry key (or "frozen") and its keyword options.

    `options.num_paths` may be "all" (k = S); `generator` is set from the run
    seed's mask stream, never from the config.
    """

    name: str = "sparse_rtrl"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """The online optimizer; lr None = the task x optimizer table's value."""

    name: str = "adam"
    lr: float | None = None


@dataclass(frozen=True)
class PretrainConfig:
    """Offline BPTT with Adam on task A (shared by every method of a seed)."""

    steps: int = 300
    batch: int = 16
    seq_len: int = 48
    washout: int = 8
    lr: float = 1e-2
    clip: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    """The online phase: the stream, the regime and what is recorded."""

    adapt_steps: int = 2000
    pre_shift_steps: int = 100
    dtype: str = "float32"
    error_regime: str = "continuous"
    readout_frozen: bool = False
    log_every: int = 500
    curve_points: int = 60
    # Reliability (see `checkpoint`): a checkpoint every `checkpoint_every`
    # steps (0: only on SIGINT/SIGTERM); the state and the learner's tensors
    # are checked every `check_every` steps (0: never) against `max_norm`, the
    # loss every step against `max_loss` (null: finiteness only).
    checkpoint_every: int = 500
    check_every: int = 50
    max_loss: float | None = 1e6
    max_norm: float | None = 1e8


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "cell": CellConfig,
    "estimator": EstimatorConfig,
    "optimizer": OptimizerConfig,
    "pretrain": PretrainConfig,
    "run": RunConfig,
}


def defaults() -> dict:
    """The default config (every section, every field)."""
    out: dict[str, Any] = {"kind": "online"}
    for name, cls in SECTIONS.items():
        out[name] = dataclasses.asdict(cls())
    return out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(key: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """`value` converted to the type of `default` (ints pass as floats)."""
    allow_none = default is None or "None" in str(annotation)
    if value is None and allow_none:
        return None
    ref = default
    if ref is None:
        ref = 0.0 if "float" in str(annotation) else ""
    if isinstance(ref, bool):
        ok = isinstance(value, bool)
    elif isinstance(ref, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(ref, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(ref, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, type(ref))
    if not ok:
        raise TypeError(
            f"config: `{key}` expects {type(ref).__name__}"
            f"{' or null' if allow_none else ''}, got {value!r} "
            f"({_type_name(value)})."
        )
    return value


def _section(name: str, given: dict) -> dict:
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}"
            f"{_suggest(unknown[0], fields, name)}; valid keys of `{name}`: "
            f"{', '.join(sorted(fields))}."
        )
    base = dataclasses.asdict(cls())
    for key, value in given.items():
        base[key] = _check_type(f"{name}.{key}", value, base[key], fields[key].type)
    return base


def _suggest(key: str, valid: Any, prefix: str = "") -> str:
    """The hint " (did you mean `x`?)" for the closest valid name, or ""."""
    match = difflib.get_close_matches(key, list(valid), n=1)
    if not match:
        return ""
    return f" (did you mean `{prefix + '.' if prefix else ''}{match[0]}`?)"


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        hint = _suggest(str(value), map(str, choices)).replace("`", "'")
        raise ValueError(
            f"config: `{key}` must be one of {', '.join(map(str, choices))}, "
            f"got {value!r}{hint}."
        )


def _check_positive(section: dict, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if section[key] <= 0:
            raise ValueError(
                f"config: `{name}.{key}` must be positive, got {section[key]}."
            )


def _check_options(key: str, options: dict, target: Any, skip: int) -> None:
    """Option names must be keyword parameters of `target`."""
    params = list(inspect.signature(target).parameters.values())[skip:]
    names = {p.name for p in params if p.kind != p.VAR_KEYWORD}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(
            f"config: unknown option(s) {', '.join(unknown)} in `{key}`; valid "
            f"options: {', '.join(sorted(names)) or '(none)'}."
        )


def _check_estimator(section: dict) -> None:
    from ..estimators import ESTIMATORS

    name, options = section["name"], section["options"]
    if name == REFERENCE_FROZEN:
        if options:
            raise ValueError("config: the 'frozen' reference takes no options.")
        return
    _check_choice("estimator.name", name, (REFERENCE_FROZEN, *sorted(ESTIMATORS)))
    if "generator" in options:
        raise ValueError(
            "config: `estimator.options.generator` is set from the run seed; remove it."
        )
    _check_options("estimator.options", options, ESTIMATORS[name].__init__, 2)
    paths = options.get("num_paths")
    if (
        paths is not None
        and paths != ALL_PATHS
        and (isinstance(paths, bool) or not isinstance(paths, int) or paths < 0)
    ):
        raise ValueError(
            "config: `estimator.options.num_paths` must be an int >= 0 or "
            f"'{ALL_PATHS}' (k = S), got {paths!r}."
        )


def _validate(config: dict) -> None:
    _check_choice("task.name", config["task"]["name"], tuple(sorted(TASKS)))
    task_cls = TASKS[config["task"]["name"]]
    _check_options("task.options", config["task"]["options"], task_cls.__init__, 1)
    _check_choice("cell.kind", config["cell"]["kind"], CELL_KINDS)
    _check_positive(config["cell"], "cell", ("hidden_size", "alpha"))
    _check_estimator(config["estimator"])
    _check_estimator_builds(config)
    _check_choice("optimizer.name", config["optimizer"]["name"], OPTIMIZERS)
    _check_positive(config["pretrain"], "pretrain", ("batch", "seq_len", "lr", "clip"))
    run = config["run"]
    _check_choice("run.dtype", run["dtype"], DTYPES)
    _check_choice("run.error_regime", run["error_regime"], REGIMES)
    _check_positive(run, "run", ("adapt_steps", "log_every", "curve_points"))
    for key in ("checkpoint_every", "check_every"):
        if run[key] < 0:
            raise ValueError(f"config: `run.{key}` must be >= 0, got {run[key]}.")
    for key in ("max_loss", "max_norm"):
        if run[key] is not None and not run[key] > 0:
            raise ValueError(
                f"config: `run.{key}` must be positive or null, got {run[key]}."
            )
    if run["pre_shift_steps"] < 0 or config["pretrain"]["steps"] < 0:
        raise ValueError(
            "config: `run.pre_shift_steps` and `pretrain.steps` must be >= 0."
        )


def _check_estimator_builds(config: dict) -> None:
    """Build the estimator around a cell of the configured kind and size, so
    its own checks (the range of `num_paths`, `selection`, the cells it
    supports) fail now, before any work starts, with the estimator's message."""
    from ..estimators import ESTIMATORS
    from .protocol import build_cell, state_size

    estimator = config["estimator"]
    if estimator["name"] == REFERENCE_FROZEN:
        return
    input_size = TASKS[config["task"]["name"]].input_size
    cell = build_cell(config["cell"], input_size)
    options = dict(estimator["options"])
    if options.get("num_paths") == ALL_PATHS:
        options["num_paths"] = state_size(cell)
    if "generator" in inspect.signature(ESTIMATORS[estimator["name"]]).parameters:
        options["generator"] = 0
    ESTIMATORS[estimator["name"]](cell, **options)


_NOT_OPTIONS = {"self", "cell", "generator", "state_size"}


def _full_options(section: dict) -> dict:
    """Estimator options with every signature default filled in (so equal runs
    hash equally however their configs were written)."""
    from ..estimators import ESTIMATORS

    if section["name"] == REFERENCE_FROZEN:
        return {}
    params = inspect.signature(ESTIMATORS[section["name"]].__init__).parameters
    out = {}
    for name, param in params.items():
        if name in _NOT_OPTIONS or param.kind in (
            param.VAR_KEYWORD,
            param.VAR_POSITIONAL,
        ):
            continue
        if param.default is not param.empty and _json_value(param.default):
            out[name] = param.default
    out.update(section["options"])
    return out


def _task_options(section: dict) -> dict:
    """Task options with every default filled in (a changed default changes the
    run's identity, so a resumed sweep never mixes two task definitions)."""
    params = inspect.signature(TASKS[section["name"]].__init__).parameters
    out = {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in params.items()
        if name != "self" and p.default is not p.empty
    }
    out.update(section["options"])
    return out


def _json_value(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def learning_rates() -> dict:
    """The shipped learning-rate table and the grid it was chosen from."""
    text = resources.files(__package__).joinpath("presets/learning_rates.json")
    return json.loads(text.read_text(encoding="utf-8"))


def default_lr(task: str, optimizer: str) -> float:
    """The table's learning rate for a task x optimizer."""
    table = learning_rates()["chosen"]
    try:
        return float(table[task][optimizer])
    except KeyError:
        raise ValueError(
            f"config: no learning rate chosen for task {task!r} with optimizer "
            f"{optimizer!r}; set `optimizer.lr` (table: presets/learning_rates.json)."
        ) from None


def resolve(config: dict) -> dict:
    """Validate a (partial) config and fill every default.

    Returns a new dict; a missing learning rate is taken from the table. The
    result resolves to itself (resolve(resolve(c)) == resolve(c)).
    """
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}.")
    kind = config.get("kind", "online")
    if kind != "online":
        return json.loads(json.dumps(config))  # another study's own config
    unknown = sorted(set(config) - set(SECTIONS) - {"kind"})
    if unknown:
        raise ValueError(
            f"config: unknown section(s) {', '.join(unknown)}; valid: kind, "
            f"{', '.join(SECTIONS)}."
        )
    out = {"kind": kind}
    for name in SECTIONS:
        given = config.get(name) or {}
        if not isinstance(given, dict):
            raise TypeError(f"config: section `{name}` must be a dict, got {given!r}.")
        out[name] = _section(name, given)
    _validate(out)
    out["estimator"]["options"] = _full_options(out["estimator"])
    out["task"]["options"] = _task_options(out["task"])
    if out["optimizer"]["lr"] is None:
        out["optimizer"]["lr"] = default_lr(
            out["task"]["name"], out["optimizer"]["name"]
        )
    return json.loads(json.dumps(out))


def parse_value(text: str) -> Any:
    """A `--set` value: JSON if it parses (1, 0.5, true, null, [..]), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `config[a][b] = value` for key "a.b" (options dicts may gain keys)."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(
                f"config: `{'.'.join(parts[: depth + 1])}` is not a section; cannot "
                f"set `{key}`."
            )
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply "dotted.key=value" overrides to a config and resolve it.

    Section keys are checked against the defaults (type and name); keys under
    an `options` dict are checked against the task's or estimator's signature.
    """
    out = json.loads(json.dumps(config))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set: expected KEY=VALUE such as cell.hidden_size=128, got {item!r}."
            )
        set_dotted(out, key.strip(), parse_value(text.strip()))
    return resolve(out)


def preset_names() -> list[str]:
    """The experiment presets shipped with the package."""
    folder = resources.files(__package__).joinpath("presets")
    return sorted(
        p.name[:-5]
        for p in folder.iterdir()
        if p.name.endswith(".json") and p.name != "learning_rates.json"
    )


def load_preset(name_or_path: str) -> dict:
    """A preset by name (see `preset_names`) or a JSON file path."""
    from pathlib import Path

    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        try:
            preset = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: not valid JSON ({error.msg} at line {error.lineno}, "
                f"column {error.colno}); fix the file or pass a preset name."
            ) from None
        if not isinstance(preset, dict):
            raise ValueError(
                f"{path}: a config file must hold a JSON object, got "
                f"{type(preset).__name__}."
            )
        return preset
    if name_or_path not in preset_names():
        raise FileNotFoundError(
            f"No config file or preset {name_or_path!r}; presets: "
            f"{', '.join(preset_names())}."
        )
    text = resources.files(__package__).joinpath(f"presets/{name_or_path}.json")
    return json.loads(text.read_text(encoding="utf-8"))


def _axis_values(values: Any, mode: str) -> list:
    if isinstance(values, dict):
        return values[mode]
    return values


def expand_preset(
    preset: dict, mode: str = "quick", overrides: list[str] = ()
) -> list[tuple[str, dict, int]]:
    """(label, resolved config, seed) for every axis point x variant x seed.

    A preset without axes and variants is a single run config (its body is
    the config itself). `overrides` apply last, after the mode's and the
    variant's settings. Variants naming an unregistered estimator are skipped
    (see `skipped_variants`).
    """
    if "base" not in preset:
        preset = {"base": preset}
    mode_set = preset.get("modes", {}).get(mode, {})
    seeds = int(mode_set.get("seeds", preset.get("seeds", 1)))
    axes = preset.get("axes", {})
    names = list(axes)
    points = itertools.product(*(_axis_values(axes[n], mode) for n in names))
    out = []
    for point in points:
        for variant in preset.get("variants", [{"label": "run", "set": {}}]):
            if variant_skipped(variant):
                continue
            config = json.loads(json.dumps(preset["base"]))
            for key, value in {
                **mode_set.get("set", {}),
                **dict(zip(names, point, strict=True)),
                **variant.get("set", {}),
            }.items():
                set_dotted(config, key, value)
            config = apply_overrides(config, list(overrides))
            label = _label(variant["label"], names, point)
            out.extend((label, config, seed) for seed in range(seeds))
    return out


def _label(name: str, axes: list[str], point: tuple) -> str:
    parts = [name] + [
        f"{a.split('.')[-1]}={v}" for a, v in zip(axes, point, strict=True)
    ]
    return " ".join(parts)


def variant_skipped(variant: dict) -> bool:
    """True when the variant names an estimator that is not registered."""
    from ..estimators import ESTIMATORS

    name = variant.get("set", {}).get("estimator.name")
    return name is not None and name != REFERENCE_FROZEN and name not in ESTIMATORS


def skipped_variants(preset: dict) -> list[str]:
    """Labels of the variants skipped because their estimator is missing."""
    return [v["label"] for v in preset.get("variants", []) if variant_skipped(v)]


def method_label(estimator: dict) -> str:
    """A short label: frozen, full, k=4, k=4 self, k=4 topk, k=n, or the key."""
    name, options = estimator["name"], estimator.get("options", {})
    if name == "frozen":
        return "frozen"
    if name == "rtrl":
        return "full"
    if name != "sparse_rtrl":
        return name
    k = options.get("num_paths", 4)
    label = "k=n" if k == "all" else f"k={k}"
    if options.get("keep_self"):
        label += " self"
    if options.get("selection", "random") != "random":
        label += f" {options['selection']}"
    return label
