"""Sweeps: run identity, grids, local pool = Dask, kill and resume, failures, CLI.

The runs use `sweep.selftest_run` (in the package, so spawned pool workers and
Dask workers import it without any test path): a seeded float64 matrix
product whose checksum depends only on its config and seed.
"""

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import types

import pytest

from sparse_rtrl.cli import main
from sparse_rtrl.experiments import sweep
from sparse_rtrl.experiments.sweep import RunSpec, run_sweep


SELFTEST = "sparse_rtrl.experiments.sweep:selftest_run"
# Runs in this process use one torch thread: two threads on a loaded 2-core
# machine can make a small matmul loop 100 times slower.
HERE = {"progress": False, "run_fn": SELFTEST, "torch_threads": 1}


def twelve_specs(**extra) -> list[RunSpec]:
    return sweep.expand_grid({"repeats": 20, **extra}, {"size": [16, 32, 48]}, seeds=4)


def log_lines(log) -> list[tuple[str, str]]:
    return [tuple(line.split()[:2]) for line in log.read_text().splitlines()]


def all_json_files_parse(out_dir) -> int:
    files = [*out_dir.rglob("*.json")]
    for path in files:
        json.loads(path.read_text())
    for path in out_dir.rglob("*.jsonl"):
        sweep.runio.read_jsonl(path)
    return len(files)


def test_run_identity_follows_design_section_9():
    spec = RunSpec({"kind": "online", "estimator": {"num_paths": 4}}, seed=2)
    text = '{"config":{"estimator":{"num_paths":4},"kind":"online"},"seed":2}'

    assert spec.run_id == hashlib.sha256(text.encode()).hexdigest()
    assert spec.folder_name == f"{spec.run_id[:12]}-s2"
    assert (
        RunSpec({"kind": "online"}, 0).run_id != RunSpec({"kind": "online"}, 1).run_id
    )


def test_run_spec_rejects_bad_input():
    with pytest.raises(TypeError, match="`seed` expected an int"):
        RunSpec({}, seed=1.0)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        RunSpec({"x": object()}, seed=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": 0}, "`workers` expected an int >= 1, got 0"),
        ({"torch_threads": 0}, "`torch_threads` expected an int >= 1, got 0"),
        ({"run_fn": "selftest_run"}, "expected 'module:function'"),
        ({"run_fn": "sparse_rtrl.experiments.sweep:nope"}, "no function 'nope'"),
    ],
)
def test_run_sweep_rejects_bad_arguments(tmp_path, options, message):
    options = {"progress": False, "run_fn": SELFTEST, **options}

    with pytest.raises(ValueError, match=message):
        run_sweep([RunSpec({"size": 4}, 0)], tmp_path, **options)
    assert not (tmp_path / "runs").exists()


def test_expand_grid_sets_dotted_keys_for_every_point_and_seed():
    base = {"kind": "online", "estimator": {"name": "snap", "lr": 0.1}}
    grid = {"estimator.num_paths": [1, 4], "task.n": [8, 16]}

    specs = sweep.expand_grid(base, grid, seeds=[5, 6])

    assert len(specs) == 8
    assert [spec.seed for spec in specs[:2]] == [5, 6]
    first, last = specs[0].config, specs[-1].config
    assert first["estimator"] == {"name": "snap", "lr": 0.1, "num_paths": 1}
    assert (first["task"], last["task"]) == ({"n": 8}, {"n": 16})
    assert last["estimator"]["num_paths"] == 4
    assert base["estimator"] == {"name": "snap", "lr": 0.1}
    assert [s.seed for s in sweep.expand_grid(base, None, seeds=3)] == [0, 1, 2]


@pytest.mark.parametrize(
    "grid, seeds, message",
    [
        ({"a": []}, 1, "non-empty list"),
        ({"kind.n": [1]}, 1, "not a section"),
        (None, 0, "seeds"),
        (None, [1.5], "seeds"),
    ],
)
def test_expand_grid_rejects_bad_grids(grid, seeds, message):
    with pytest.raises(ValueError, match=message):
        sweep.expand_grid({"kind": "online"}, grid, seeds)


def test_sweep_file_is_resolved_by_the_config_module(tmp_path, monkeypatch):
    fake = types.ModuleType("sparse_rtrl.experiments.config")
    fake.resolve = lambda config: {"defaulted": True, **config}
    monkeypatch.setitem(sys.modules, "sparse_rtrl.experiments.config", fake)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": {"kind": "online"}, "grid": {"n": [1, 2]}}))

    specs, run_fn = sweep.load_sweep_file(path)

    assert run_fn == sweep.DEFAULT_RUN_FN
    assert [s.config for s in specs] == [
        {"defaulted": True, "kind": "online", "n": 1},
        {"defaulted": True, "kind": "online", "n": 2},
    ]


def test_local_pool_and_dask_give_the_same_summaries(tmp_path):
    distributed = pytest.importorskip("distributed")
    specs = twelve_specs()

    local = run_sweep(
        specs, tmp_path / "local", workers=2, progress=False, run_fn=SELFTEST
    )
    with distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        on_dask = run_sweep(
            specs,
            tmp_path / "dask",
            scheduler=cluster.scheduler_address,
            progress=False,
            run_fn=SELFTEST,
        )

    assert (local.done, local.failed, local.pending) == (12, 0, 0)
    assert (on_dask.done, on_dask.failed, on_dask.pending) == (12, 0, 0)
    assert on_dask.summaries == local.summaries
    assert len({s["checksum"] for s in local.summaries.values()}) == 12
    for result in (local, on_dask):
        saved = json.loads((result.out_dir / "sweep.json").read_text())
        assert saved["counts"]["done"] == 12
        for run_id, folder in result.folders.items():
            summary = json.loads((folder / "summary.json").read_text())
            assert summary == local.summaries[run_id]


KILL_SCRIPT = """
import json, sys
from sparse_rtrl.experiments.sweep import RunSpec, run_sweep
specs = [RunSpec(s["config"], s["seed"]) for s in json.loads(sys.argv[1])]
run_sweep(specs, sys.argv[2], workers=2, progress=False, run_fn=sys.argv[3])
"""


def test_killed_sweep_resumes_and_never_reruns_a_finished_run(tmp_path):
    log, out = tmp_path / "invocations.log", tmp_path / "out"
    specs = twelve_specs(repeats=300, log=str(log))
    payload = json.dumps([{"config": s.config, "seed": s.seed} for s in specs])
    env = {**os.environ, sweep.KILL_AFTER_ENV: "4"}

    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, payload, str(out), SELFTEST],
        env=env,
        start_new_session=True,
        timeout=120,
        capture_output=True,
    )
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    counts_at_kill = json.loads((out / "sweep.json").read_text())["counts"]
    before_resume = len(log_lines(log))
    result = run_sweep(specs, out, **HERE)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert counts_at_kill["done"] >= 4 and len(finished) >= 4
    assert len(finished) < 12, "the kill came too late to test a resume"
    assert (result.done, result.failed, result.resumed) == (12, 0, len(finished))
    events = log_lines(log)
    # The resume runs exactly the runs without a saved summary, once each (a
    # run the kill cut off between its last step and its summary among them).
    resumed = collections.Counter(
        name for event, name in events[before_resume:] if event == "end"
    )
    assert sorted(resumed.elements()) == sorted(
        s.folder_name for s in specs if s.folder_name not in finished
    )
    for name, mtime in finished.items():
        assert events.count(("start", name)) == 1
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == mtime
    assert all_json_files_parse(out) >= 12 * 3 + 1
    reference = run_sweep(specs[:3], tmp_path / "ref", **HERE)
    for run_id, summary in reference.summaries.items():
        assert result.summaries[run_id] == summary


def test_failed_and_diverged_runs_are_recorded_and_the_rest_finish(tmp_path):
    log = tmp_path / "invocations.log"
    specs = [
        RunSpec({"size": 8, "log": str(log)}, 0),
        RunSpec({"size": 8, "fail": "loss is a banana", "log": str(log)}, 0),
        RunSpec({"size": 8, "diverge": True, "log": str(log)}, 0),
        RunSpec({"size": 8, "log": str(log)}, 1),
    ]

    result = run_sweep(specs, tmp_path / "out", **HERE)

    assert (result.done, result.failed, result.diverged) == (2, 2, 1)
    failed, diverged = specs[1].run_id, specs[2].run_id
    error = json.loads((result.folders[failed] / "error.json").read_text())
    assert error["status"] == "failed" and error["message"] == "loss is a banana"
    assert "ValueError: loss is a banana" in error["traceback"]
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert saved["counts"] | {"resumed": 0} == {
        "done": 2, "failed": 2, "diverged": 1, "pending": 0, "total": 4,
        "resumed": 0,
    }  # fmt: skip
    assert saved["runs"][failed]["error"]["traceback"] == error["traceback"]
    assert saved["runs"][diverged]["status"] == "diverged"
    assert "diverged at step" in result.errors[diverged]["message"]
    assert not (result.folders[failed] / "summary.json").exists()

    again = run_sweep(specs, tmp_path / "out", **HERE)

    assert (again.resumed, again.failed) == (2, 2)
    starts = [name for event, name in log_lines(log) if event == "start"]
    assert sorted(starts.count(s.folder_name) for s in specs) == [1, 1, 2, 2]


def test_cli_sweep_runs_resumes_and_reports(tmp_path, capsys):
    sweep_file = tmp_path / "grid.json"
    sweep_file.write_text(
        json.dumps(
            {
                "base": {"repeats": 3},
                "grid": {"size": [4, 8]},
                "seeds": 2,
                "run_fn": SELFTEST,
            }
        )
    )
    out = tmp_path / "out"

    command = ["sweep", str(sweep_file), "--out", str(out), "--torch-threads", "1"]
    assert main(command) == 0
    assert main(["sweep", str(sweep_file), "--out", str(out), "--dry-run"]) == 0

    printed = capsys.readouterr().out
    assert "sweep: 4 done (0 already), 0 failed" in printed
    assert "4 runs, 4 finished" in printed
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 4
    files = {p.name for p in (out / "runs" / runs[0]).iterdir()}
    assert files == {"config.json", "argv.txt", "env.json", "metrics.jsonl",
                     "summary.json"}  # fmt: skip
    saved = json.loads((out / "runs" / runs[0] / "config.json").read_text())
    assert RunSpec(saved["config"], saved["seed"]).folder_name == runs[0]
    assert len(sweep.runio.read_jsonl(out / "runs" / runs[0] / "metrics.jsonl")) == 3


def test_cli_sweep_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid": {}}))

    assert main(["sweep", str(bad)]) == 2
    assert main(["sweep", str(tmp_path / "missing.json")]) == 2

    err = capsys.readouterr().err
    assert "'base' required" in err
    assert "missing.json" in err


def test_scheduler_without_dask_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    specs = [RunSpec({"size": 4}, 0)]

    with pytest.raises(ImportError, match=r"sparse-rtrl\[dask\]"):
        run_sweep(specs, tmp_path, scheduler="tcp://127.0.0.1:1", run_fn=SELFTEST)


@pytest.mark.slow
def test_pool_worker_death_fails_only_that_run(tmp_path):
    specs = [RunSpec({"size": 8}, 0), RunSpec({"size": 8, "crash": True}, 0)]
    specs.append(RunSpec({"size": 8}, 1))

    result = run_sweep(specs, tmp_path, workers=2, progress=False, run_fn=SELFTEST)

    assert (result.done, result.failed) == (2, 1)
    error = result.errors[specs[1].run_id]
    assert "died" in error["message"] and error["type"] == "BrokenProcessPool"
