"""Reliability: interrupted runs resume bitwise, divergence stops cleanly."""

import json

import pytest
import torch

from sparse_rtrl.experiments import checkpoint
from sparse_rtrl.experiments import config as cfg
from sparse_rtrl.experiments.protocol import run_online
from sparse_rtrl.experiments.report import detail_tables
from sparse_rtrl.experiments.sweep import RunSpec, run_sweep


def tiny(estimator, options, dtype, **run):
    return cfg.resolve(
        {
            "task": {"name": "delayed_recall"},
            "cell": {"hidden_size": 6},
            "estimator": {"name": estimator, "options": options},
            "pretrain": {"steps": 10, "batch": 4, "seq_len": 12},
            "run": {
                "adapt_steps": 60,
                "pre_shift_steps": 8,
                "log_every": 20,
                "dtype": dtype,
                "checkpoint_every": 25,
                **run,
            },
        }
    )


def _results(summary):
    """Everything a run measured (not its timing)."""
    return {k: v for k, v in summary.items() if k != "ms_per_step"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("estimator", "options"),
    [
        ("rtrl", {}),
        ("sparse_rtrl", {"num_paths": 2, "selection": "random"}),
    ],
)
def test_interrupted_run_resumes_bitwise(
    tmp_path, monkeypatch, estimator, options, dtype
):
    config = tiny(estimator, options, dtype)
    whole_dir = tmp_path / "a" / "runs" / "r"
    whole_dir.mkdir(parents=True)
    whole = run_online(config, 3, whole_dir)

    # Interrupt after step 41 (the pre-shift warm-up is 8 steps): a checkpoint
    # is written at the interruption, after one at step 25.
    folder = tmp_path / "b" / "runs" / "r"
    folder.mkdir(parents=True)
    monkeypatch.setenv(checkpoint.INTERRUPT_VARIABLE, "41")
    with pytest.raises(checkpoint.Interrupted, match=r"interrupted after step 41"):
        run_online(config, 3, folder)
    saved = torch.load(folder / checkpoint.CHECKPOINT_NAME, weights_only=False)
    assert saved["position"] == 41

    monkeypatch.delenv(checkpoint.INTERRUPT_VARIABLE)
    monkeypatch.setenv(checkpoint.RESUME_VARIABLE, "1")
    resumed = run_online(config, 3, folder)
    assert _results(resumed) == _results(whole)
    assert not (folder / checkpoint.CHECKPOINT_NAME).exists()


def test_without_resume_an_interrupted_run_starts_over(tmp_path, monkeypatch):
    config = tiny("rtrl", {}, "float64")
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    monkeypatch.delenv(checkpoint.RESUME_VARIABLE, raising=False)
    monkeypatch.setenv(checkpoint.INTERRUPT_VARIABLE, "30")
    with pytest.raises(checkpoint.Interrupted):
        run_online(config, 0, folder)
    monkeypatch.delenv(checkpoint.INTERRUPT_VARIABLE)
    fresh = run_online(config, 0, folder)  # the stale checkpoint is discarded
    again = run_online(config, 0, tmp_path / "runs" / "r")
    assert _results(fresh) == _results(again)


def test_a_diverging_run_is_stopped_and_reported(tmp_path):
    config = tiny("rtrl", {}, "float32")
    config["optimizer"] = {"name": "sgd", "lr": 1e4}
    config = cfg.resolve(config)
    specs = [RunSpec(config, 0)]
    result = run_sweep(specs, tmp_path, progress=False)
    (error,) = result.errors.values()
    assert error["status"] == "diverged"
    assert "step" in error["message"]
    assert any(
        word in error["message"] for word in ("non-finite", "exceeds", "exploded")
    )

    table = detail_tables(
        {
            rid: {"status": "diverged", "diverged": True, "message": e["message"]}
            for rid, e in result.errors.items()
        },
        result.specs,
    )
    assert "nan" not in table.lower()
    assert "diverged" in table


def test_guard_bounds_are_validated():
    with pytest.raises(ValueError, match=r"`run.max_loss` must be positive or null"):
        tiny("rtrl", {}, "float32", max_loss=-1.0)
    with pytest.raises(ValueError, match=r"`run.check_every` must be >= 0"):
        tiny("rtrl", {}, "float32", check_every=-5)
    assert json.dumps(tiny("rtrl", {}, "float32", max_loss=None))


def test_cli_run_interrupted_then_resumed(tmp_path, monkeypatch, capsys):
    """`sparse-rtrl run` stopped mid-run (as by Ctrl-C), then `--resume`."""
    from sparse_rtrl.cli import main

    monkeypatch.setenv(checkpoint.RESUME_VARIABLE, "0")  # restored afterwards
    config = tiny("sparse_rtrl", {"num_paths": 2}, "float32")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert main(["run", str(path), "--out", str(tmp_path / "whole")]) == 0

    monkeypatch.setenv(checkpoint.INTERRUPT_VARIABLE, "33")
    assert main(["run", str(path), "--out", str(tmp_path / "cut")]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.delenv(checkpoint.INTERRUPT_VARIABLE)
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--resume"]) == 0

    def summary(folder):
        (found,) = (tmp_path / folder / "runs").glob("*/summary.json")
        return _results(json.loads(found.read_text()))

    assert summary("cut") == summary("whole")
