"""runio: canonical hashes, atomic writes that never leave half a file, the cache."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_rtrl.experiments import runio


RUNIO_FILE = Path(runio.__file__)


def test_canonical_json_ignores_key_order_and_spacing():
    a = {"b": [1, 2.5, None], "a": {"y": True, "x": "s"}}
    b = {"a": {"x": "s", "y": True}, "b": [1, 2.5, None]}

    assert runio.canonical_json(a) == runio.canonical_json(b)
    assert runio.canonical_json(a) == '{"a":{"x":"s","y":true},"b":[1,2.5,null]}'


def test_config_hash_is_sha256_of_canonical_json():
    config = {"seed": 3, "config": {"kind": "online", "n": 64}}
    text = '{"config":{"kind":"online","n":64},"seed":3}'

    assert runio.config_hash(config) == hashlib.sha256(text.encode()).hexdigest()
    assert runio.config_hash(config) != runio.config_hash({**config, "seed": 4})


def test_atomic_write_json_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "summary.json"

    runio.atomic_write_json(path, {"loss": 0.5, "b": [1, 2]})
    runio.atomic_write_text(tmp_path / "argv.txt", "sparse-rtrl sweep x\n")

    assert runio.read_json(path) == {"loss": 0.5, "b": [1, 2]}
    assert (tmp_path / "argv.txt").read_text() == "sparse-rtrl sweep x\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    runio.atomic_write_json(path, {"loss": 1.0})

    with pytest.raises(TypeError):
        runio.atomic_write_json(path, {"loss": object()})

    assert runio.read_json(path) == {"loss": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_torch_save_round_trips(tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3)}

    runio.atomic_torch_save(tmp_path / "net.pt", state)

    loaded = torch.load(tmp_path / "net.pt")
    assert torch.equal(loaded["weight"], state["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]


def test_read_jsonl_skips_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    runio.append_jsonl(path, {"step": 0, "loss": 1.0})
    runio.append_jsonl(path, {"step": 1, "loss": 0.5})

    with open(path, "a") as file:
        file.write('{"step": 2, "lo')  # a kill in the middle of a line

    assert runio.read_jsonl(path) == [
        {"loss": 1.0, "step": 0},
        {"loss": 0.5, "step": 1},
    ]

    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        runio.read_jsonl(path)


def test_env_record_names_versions_and_host():
    record = runio.env_record()

    assert record["torch"] == torch.__version__
    assert record["python"] == sys.version.split()[0]
    expected = {"sparse_rtrl", "git_commit", "numpy", "device", "hostname", "time"}
    assert expected <= set(record)
    json.dumps(record)


# Each process loads runio.py on its own (no torch import) to keep this fast.
CACHE_SCRIPT = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runio", sys.argv[1])
runio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runio)
target, counter = sys.argv[2], sys.argv[3]

def compute():
    with open(counter, "a") as file:
        file.write("computed\\n")
    time.sleep(0.3)
    return "artefact"

def save(path, value):
    path.write_text(value)

value = runio.cached(target, compute, lambda path: path.read_text(), save)
print(value)
"""


def test_cached_computes_once_across_processes(tmp_path):
    target, counter = tmp_path / "cache" / "net.txt", tmp_path / "counter"
    command = [sys.executable, "-c", CACHE_SCRIPT, RUNIO_FILE, target, counter]

    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = [process.communicate(timeout=60)[0] for process in processes]

    assert [process.returncode for process in processes] == [0, 0, 0]
    assert outputs == ["artefact\n"] * 3
    assert counter.read_text() == "computed\n"


def test_cached_leaves_nothing_when_compute_fails(tmp_path):
    target = tmp_path / "net.pt"

    def fail():
        raise RuntimeError("pretraining diverged")

    with pytest.raises(RuntimeError, match="pretraining diverged"):
        runio.cached(target, fail, torch.load, lambda p, v: torch.save(v, p))
    value = runio.cached(
        target, lambda: torch.ones(2), torch.load, lambda p, v: torch.save(v, p)
    )

    assert torch.equal(value, torch.ones(2))
    assert torch.equal(torch.load(target), torch.ones(2))
