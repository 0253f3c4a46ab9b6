"""`sparse-rtrl reproduce`: every study's runs through one resumable sweep, then
the report.

`reproduce(out_dir, quick=...)` collects the specs of every study in
`studies.STUDIES`, saves them in `out_dir/reproduce.json` (so the report can
be rebuilt from exactly these runs), runs them with `sweep.run_sweep` (a
finished run is never run again: rerunning resumes) and writes
`out_dir/report.md` and `out_dir/figures/*.png` with `build_report`.
`build_report(out_dir)` reads only saved files: the manifest and the runs'
`summary.json` / `error.json`.
"""

import os
import time
import traceback
from pathlib import Path

from . import runio
from .claims import NOT_MEASURED, ClaimRow
from .report import detail_tables, write_report


MANIFEST = "reproduce.json"


def collect_specs(quick: bool, names: list[str] | None = None) -> dict[str, list]:
    """{study name: [RunSpec]} for the selected studies (all by default)."""
    from .studies import STUDIES

    names = list(STUDIES) if names is None else names
    unknown = sorted(set(names) - set(STUDIES))
    if unknown:
        raise ValueError(
            f"reproduce: unknown study(ies) {', '.join(unknown)}; available: "
            f"{', '.join(STUDIES)}."
        )
    return {name: STUDIES[name].specs(quick) for name in names}


def reproduce(
    out_dir: Path,
    *,
    quick: bool = False,
    workers: int = 1,
    scheduler=None,
    progress=True,
    studies: list[str] | None = None,
    overrides: list[str] = (),
) -> Path:
    """Run (or resume) every study and write the report; returns its path.

    `overrides` ("dotted.key=value") apply to every online run (e.g. to shrink
    the streams for a smoke test); other studies' runs are left as they are.
    """
    from .checkpoint import RESUME_VARIABLE
    from .sweep import run_sweep

    os.environ[RESUME_VARIABLE] = "1"  # interrupted runs continue (bitwise)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    by_study = collect_specs(quick, studies)
    if overrides:
        by_study = {
            n: _override(specs, list(overrides)) for n, specs in by_study.items()
        }
    manifest = {
        "mode": "quick" if quick else "full",
        "order": list(by_study),
        "studies": {
            n: [{"config": s.config, "seed": s.seed} for s in specs]
            for n, specs in by_study.items()
        },
    }
    runio.atomic_write_json(out_dir / MANIFEST, manifest)
    # Longest runs first, so that no expensive run is left for the end.
    all_specs = sorted(
        (s for specs in by_study.values() for s in specs), key=_cost, reverse=True
    )
    run_sweep(
        all_specs, out_dir, workers=workers, scheduler=scheduler, progress=progress
    )
    manifest["wall_seconds"] = time.perf_counter() - start
    manifest["workers"] = workers
    manifest["env"] = runio.env_record()
    runio.atomic_write_json(out_dir / MANIFEST, manifest)
    return build_report(out_dir)


def _cost(spec) -> float:
    """A rough per-step cost of a run: S^2 P for exact RTRL, S k P otherwise."""
    config = spec.config
    if config.get("kind") != "online":
        return 0.0
    n = config["cell"]["hidden_size"]
    steps = config["run"]["adapt_steps"]
    exact = config["estimator"]["name"] == "rtrl"
    return steps * n**2 * (n if exact else 4)


def _override(specs: list, overrides: list[str]) -> list:
    from .config import apply_overrides
    from .sweep import RunSpec

    return [
        RunSpec(apply_overrides(s.config, overrides), s.seed)
        if s.config.get("kind") == "online"
        else s
        for s in specs
    ]


def load_results(out_dir: Path) -> tuple[dict, dict[str, list], dict]:
    """(manifest, {study: [RunSpec]}, {run_id: summary or error stub})."""
    from .sweep import RunSpec, collect

    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"report: {path} not found; `DIR` must be the --out folder of "
            "`sparse-rtrl reproduce`."
        )
    manifest = runio.read_json(path)
    order = manifest.get("order", sorted(manifest["studies"]))
    by_study = {
        n: [RunSpec(i["config"], i["seed"]) for i in manifest["studies"][n]]
        for n in order
    }
    result = collect([s for v in by_study.values() for s in v], out_dir)
    summaries = dict(result.summaries)
    for run_id, error in result.errors.items():
        summaries[run_id] = {
            "status": error.get("status", "failed"),
            "diverged": error.get("status") == "diverged",
            "message": error.get("message", ""),
        }
    return manifest, by_study, summaries


def _failed_row(name: str, claims: tuple, error: BaseException) -> ClaimRow:
    return ClaimRow(
        claim=", ".join(claims),
        statement=f"study {name}",
        paper="",
        measured="",
        n_seeds=0,
        ci="",
        losses="",
        verdict=NOT_MEASURED,
        criterion="",
        notes=f"building the rows failed: {type(error).__name__}: {error}",
    )


def build_report(out_dir: Path) -> Path:
    """Rebuild `report.md` and the figures from the saved results."""
    from .studies import STUDIES

    out_dir = Path(out_dir)
    manifest, by_study, summaries = load_results(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, specs in by_study.items():
        study = STUDIES.get(name)
        if study is None:
            continue
        subset = {s.run_id: summaries[s.run_id] for s in specs if s.run_id in summaries}
        try:
            rows = study.rows(subset, specs)
        except Exception as error:  # one study's bug must not hide the others
            traceback.print_exc()
            rows = [_failed_row(name, study.claims, error)]
        figures = []
        if study.figures is not None:
            try:
                figures = [Path(p) for p in study.figures(subset, specs, figures_dir)]
            except Exception:
                traceback.print_exc()
        details = detail_tables(subset, specs)
        sections.append(
            {"name": name, "rows": rows, "details": details, "figures": figures}
        )
    meta = {"mode": manifest["mode"], "preamble": _preamble(manifest, summaries)}
    return write_report(out_dir, sections, meta)


def _preamble(manifest: dict, summaries: dict) -> str:
    n_runs = len(
        {runio.config_hash(i) for v in manifest["studies"].values() for i in v}
    )
    failed = sum(1 for s in summaries.values() if "status" in s)
    wall = manifest.get("wall_seconds")
    env = manifest.get("env", {})
    parts = [f"{n_runs} runs ({failed} failed or diverged)."]
    if wall is not None:
        parts.append(
            f"Wall time of the last `reproduce` call: {wall / 60:.1f} min "
            f"with {manifest.get('workers', 1)} worker(s) on "
            f"{env.get('device', '?')} (git {str(env.get('git_commit'))[:10]}, "
            f"torch {env.get('torch', '?')})."
        )
    return " ".join(parts)
