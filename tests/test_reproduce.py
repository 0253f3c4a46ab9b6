"""Presets, the reproduce pipeline and the report rebuilt from saved results."""

import pytest

from sparse_rtrl.cli import main
from sparse_rtrl.experiments import config as cfg
from sparse_rtrl.experiments.reproduce import build_report, reproduce
from sparse_rtrl.experiments.studies import BENCHMARK_STUDIES, STUDIES


TINY = [
    "cell.hidden_size=16",
    "run.adapt_steps=12",
    "run.pre_shift_steps=4",
    "run.log_every=6",
    "pretrain.steps=1",
    "pretrain.batch=2",
    "pretrain.seq_len=10",
    "task.options={}",
]


def _online(name):
    preset = cfg.load_preset(name)
    return preset.get("base", preset).get("kind", "online") == "online"


ONLINE_PRESETS = [name for name in cfg.preset_names() if _online(name)]


def test_every_preset_expands_and_resolves_in_both_modes():
    for name in ONLINE_PRESETS:
        preset = cfg.load_preset(name)
        for mode in ("quick", "full"):
            items = cfg.expand_preset(preset, mode)
            assert items, name
            for _, config, _ in items:
                assert cfg.resolve(config) == config


def test_skipped_variants_are_reported():
    preset = {
        "base": {},
        "variants": [{"label": "x", "set": {"estimator.name": "no_such"}}],
    }
    assert cfg.skipped_variants(preset) == ["x"]
    assert cfg.expand_preset(preset) == []


@pytest.mark.parametrize("name", ONLINE_PRESETS)
def test_smoke_run_of_every_preset_at_a_tiny_size(name, tmp_path, capsys):
    skipped = cfg.skipped_variants(cfg.load_preset(name))
    if skipped:
        print(f"note: {name}: skipping unregistered {', '.join(skipped)}")
    argv = ["run", name, "--seeds", "1", "--out", str(tmp_path)]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| method | recovery |" in out and "0 failed" in out


def test_report_rebuilds_identical_tables_from_saved_results(tmp_path):
    studies = ["selection", "lorenz", "error_regime"]
    path = reproduce(
        tmp_path,
        quick=True,
        progress=False,
        studies=studies,
        overrides=TINY[:-1] + ["pretrain.steps=0"],
    )
    first = path.read_text()
    assert "| C3 |" in first and "| C6 |" in first and "| C10 |" in first
    assert (tmp_path / "figures" / "selection.png").exists()
    path.unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert build_report(tmp_path).read_text() == first


def test_benchmark_studies_cover_their_claims():
    claims = {c for s in BENCHMARK_STUDIES.values() for c in s.claims}
    assert {"C1", "C2", "C3", "C4", "C6", "C7", "C10", "C11"} <= claims
    assert set(BENCHMARK_STUDIES) <= set(STUDIES)
