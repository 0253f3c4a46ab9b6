"""Bad input to the CLI: a clear one-line error and a non-zero exit, no traceback."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sparse_rtrl.cli import main
from test_neural_loaders import write_falcon


TINY = {
    "task": {"name": "delayed_recall"},
    "cell": {"hidden_size": 6},
    "estimator": {"name": "sparse_rtrl", "options": {"num_paths": 2}},
    "pretrain": {"steps": 2, "batch": 2, "seq_len": 8},
    "run": {"adapt_steps": 10, "pre_shift_steps": 2, "log_every": 5},
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


CASES = {
    "unknown key": (
        ["--set", "cell.hiden_size=8"],
        r"unknown key\(s\) cell.hiden_size \(did you mean "
        r"`cell.hidden_size`\?\)",
    ),
    "wrong type": (
        ["--set", "cell.hidden_size=abc"],
        r"`cell.hidden_size` expects int, got 'abc'",
    ),
    "num_paths out of range": (
        ["--set", "estimator.options.num_paths=99"],
        r"`num_paths` must be in \[0, state_size=6\], got 99",
    ),
    "num_paths negative": (
        ["--set", "estimator.options.num_paths=-1"],
        r"`estimator.options.num_paths` must be an int >= 0",
    ),
    "unknown estimator": (
        ["--set", "estimator.name=uoro2"],
        r"`estimator.name` must be one of .*uoro.* got 'uoro2' "
        r"\(did you mean 'uoro'\?\)",
    ),
    "unsupported cell": (
        [
            "--set",
            "estimator.name=kf_rtrl",
            "--set",
            "estimator.options={}",
            "--set",
            "cell.kind=GRUCell",
        ],
        r"KFRTRL supports RNNCell, LeakyRNNCell; got GRUCell\. "
        r"Estimators that support GRUCell: .*rtrl",
    ),
    "negative size": (
        ["--set", "cell.hidden_size=-4"],
        r"`cell.hidden_size` must be positive, got -4",
    ),
    "empty stream": (
        ["--set", "run.adapt_steps=0"],
        r"`run.adapt_steps` must be positive, got 0",
    ),
    "unknown selection": (
        ["--set", "estimator.options.selection=best"],
        r"unknown `selection` 'best'; expected one of random",
    ),
    "unknown task": (
        ["--set", "task.name=sinus"],
        r"`task.name` must be one of .* \(did you mean 'sine'\?\)",
    ),
    "unknown section": (["--set", "model.size=3"], r"unknown section\(s\) model"),
    "malformed --set": (["--set", "cell.hidden_size"], r"--set: expected KEY=VALUE"),
    "bad dtype": (
        ["--set", "run.dtype=float16"],
        r"`run.dtype` must be one of float32, float64, got 'float16'",
    ),
    "unknown optimizer": (
        ["--set", "optimizer.name=adamw"],
        r"`optimizer.name` must be one of adam, sgd, rmsprop",
    ),
    "NaN bound": (
        ["--set", "run.max_loss=NaN"],
        r"`run.max_loss` must be positive or null, got nan",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_settings(case, config_file, tmp_path, capsys):
    args, message = CASES[case]
    code = main(["run", str(config_file), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sparse-rtrl run: error: ")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_malformed_config_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"cell": {"hidden_size": 8,}}')
    assert main(["run", str(path)]) == 2
    assert f"{path}: not valid JSON" in capsys.readouterr().err


def test_unknown_preset(capsys):
    assert main(["run", "no_such_preset"]) == 2
    assert "No config file or preset 'no_such_preset'; presets: " in (
        capsys.readouterr().err
    )


def test_report_of_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "must be the --out folder of `sparse-rtrl reproduce`" in (
        capsys.readouterr().err
    )


def test_nan_in_a_data_file(tmp_path, capsys):
    path = tmp_path / "day1.nwb"
    write_falcon(path)
    import h5py

    with h5py.File(path, "r+") as file:
        file["units/spike_times"][3] = np.nan
    code = main(
        [
            "run",
            "bci",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"data.path={path}",
        ]
    )
    out = capsys.readouterr()
    assert code != 0
    assert "non-finite spike time(s) (NaN or inf)" in out.out + out.err
    assert str(path) in out.out + out.err
    assert "Traceback" not in out.err


def test_cli_process_exits_cleanly(tmp_path):
    """The installed console script: exit code 2 and one line, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "sparse_rtrl", "run", "no_such_preset"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
