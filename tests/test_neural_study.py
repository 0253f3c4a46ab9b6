"""The synthetic recording generator and the C9 cross-session BCI study."""

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest
import torch
from pynwb import NWBHDF5IO, NWBFile
from pynwb.behavior import BehavioralTimeSeries

from sparse_rtrl.experiments import runio
from sparse_rtrl.experiments.neural import Drift, make_sessions, study
from sparse_rtrl.experiments.neural.study import (
    resolve_bci,
    run_bci,
    study_configs,
    study_rows,
)
from sparse_rtrl.experiments.runner import RUN_KINDS
from sparse_rtrl.experiments.studies import STUDIES
from sparse_rtrl.experiments.sweep import RunSpec


# The synthetic generator ---------------------------------------------------------


def ridge_errors(sessions, split=0.7, penalty=1.0):
    """Fit a ridge decoder on the first session's start; MSE on its rest and on
    each later session (velocity has unit variance, so MSE ~ unexplained share).
    """
    source = sessions[0]
    cut = int(split * source.num_bins)

    def features(counts):  # counts smoothed over 5 bins, plus a bias column
        kernel = np.ones(5) / 5
        smooth = np.apply_along_axis(np.convolve, 0, counts, kernel, mode="same")
        return np.hstack((smooth, np.ones((len(counts), 1))))

    x, y = features(source.spikes[:cut]), source.velocity[:cut]
    weights = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ y)
    held = features(source.spikes[cut:]) @ weights - source.velocity[cut:]
    later = [features(s.spikes) @ weights - s.velocity for s in sessions[1:]]
    return float(np.mean(held**2)), [float(np.mean(e**2)) for e in later]


def test_synthetic_sessions_are_deterministic_from_the_seed():
    first = make_sessions(2, num_bins=[300, 200], num_channels=16, seed=5)
    again = make_sessions(2, num_bins=[300, 200], num_channels=16, seed=5)
    longer = make_sessions(2, num_bins=[300, 400], num_channels=16, seed=5)
    other = make_sessions(2, num_bins=[300, 200], num_channels=16, seed=6)

    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.spikes, b.spikes)
        np.testing.assert_array_equal(a.velocity, b.velocity)
    np.testing.assert_array_equal(first[0].spikes, longer[0].spikes)
    assert not np.array_equal(first[0].spikes, other[0].spikes)
    assert first[1].date - first[0].date == dt.timedelta(days=7)
    assert all(s.synthetic and s.kind == "synthetic" for s in first)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_synthetic_drift_raises_a_frozen_decoders_error(seed):
    sizes = {"num_bins": [3000, 1000], "num_channels": 48, "seed": seed}
    held, (target,) = ridge_errors(make_sessions(2, **sizes))
    held_stable, (target_stable,) = ridge_errors(
        make_sessions(2, drift=Drift(0, 0, 0, 0), **sizes)
    )

    assert held < 0.5  # the source is decodable
    assert target_stable < 1.3 * held_stable  # no drift: the error holds
    assert target / held > 1.4 * target_stable / held_stable  # drift: it rises


def test_synthetic_drift_drops_and_swaps_channels():
    drift = Drift(gain_sd=0, baseline_sd=0, drop_fraction=0.25, swap_fraction=0)
    source, target = make_sessions(2, num_bins=2000, num_channels=40, drift=drift)

    silent = target.spikes.sum(axis=0) == 0
    assert silent.sum() == 10 and not (source.spikes.sum(axis=0) == 0).any()

    drift = Drift(gain_sd=0, baseline_sd=0, drop_fraction=0, swap_fraction=0.5)
    source, target = make_sessions(2, num_bins=4000, num_channels=40, drift=drift)
    rate_source, rate_target = source.spikes.mean(0), target.spikes.mean(0)
    moved = ~np.isclose(rate_source, rate_target, rtol=0.15)
    assert moved.sum() >= 10  # about 20 channels traded places


def test_synthetic_rejects_bad_settings():
    with pytest.raises(ValueError, match="drop_fraction"):
        Drift(drop_fraction=1.5)
    with pytest.raises(ValueError, match="latent_size"):
        make_sessions(2, latent_size=3)
    with pytest.raises(ValueError, match="num_bins"):
        make_sessions(2, num_bins=[10])


# Config -------------------------------------------------------------------------


def test_resolve_fills_defaults_and_names_bad_keys():
    config = resolve_bci({"kind": "bci", "data": {"bin_size": 0.05}})
    assert config["data"]["bin_size"] == 0.05
    assert config["cell"]["hidden_size"] == 64
    assert resolve_bci(config) == config

    with pytest.raises(ValueError, match=r"data\.bins_size.*valid keys of `data`"):
        resolve_bci({"data": {"bins_size": 0.05}})
    with pytest.raises(TypeError, match="cell.hidden_size"):
        resolve_bci({"cell": {"hidden_size": "big"}})
    with pytest.raises(ValueError, match="data.holdout"):
        resolve_bci({"data": {"holdout": 1.0}})
    with pytest.raises(ValueError, match="estimator.name"):
        resolve_bci({"estimator": {"name": "magic", "options": {}}})


def test_study_is_registered_and_quick_is_small():
    assert RUN_KINDS["bci"] == "sparse_rtrl.experiments.neural.study:run_bci"
    assert STUDIES["bci"].claims == ("C9",)
    quick = study_configs(True)
    labels = {label for label, _, _ in quick}
    assert {"frozen", "rtrl", "k=0", "k=1", "k=4", "k=16"} == labels
    assert {seed for _, _, seed in quick} == {0, 1, 2}
    assert all(c["data"]["path"] is None for _, c, _ in quick)
    full = study_configs(False)
    assert {seed for _, _, seed in full} == {0, 1, 2, 3, 4}
    assert {"snap", "uoro", "rflo"} <= {label for label, _, _ in full}


# Smoke runs ---------------------------------------------------------------------

TINY = {
    "kind": "bci",
    "data": {
        "holdout": 0.25,
        "synthetic": {"num_channels": 12, "source_bins": 400, "target_bins": 120},
    },
    "cell": {"hidden_size": 8},
    "optimizer": {"name": "adam", "lr": 0.001},
    "pretrain": {"steps": 60, "batch": 8, "seq_len": 30, "washout": 5, "lr": 0.02},
    "run": {"pre_shift_steps": 20, "dtype": "float64", "log_every": 50},
}


def tiny(method, **options):
    config = json.loads(json.dumps(TINY))
    config["estimator"] = {"name": method, "options": options}
    return resolve_bci(config)


def test_smoke_run_on_synthetic_data_is_labelled_and_shares_the_decoder(tmp_path):
    specs = [
        RunSpec(tiny("frozen"), 0),
        RunSpec(tiny("rtrl"), 0),
        RunSpec(tiny("sparse_rtrl", num_paths=4), 0),
        RunSpec(tiny("sparse_rtrl", num_paths="all"), 0),
    ]
    summaries = {}
    for spec in specs:
        run_dir = tmp_path / "runs" / spec.folder_name
        run_dir.mkdir(parents=True)
        summaries[spec.run_id] = run_bci(spec.config, spec.seed, run_dir)

    frozen, rtrl, k4, k_all = (summaries[s.run_id] for s in specs)
    assert runio.read_json(tmp_path / "runs" / specs[0].folder_name / "data.json")[
        "synthetic"
    ]
    assert all(s["synthetic"] and s["method"] for s in summaries.values())
    assert len({s["pretrained_hash"] for s in summaries.values()}) == 1
    assert len({s["stream_hash"] for s in summaries.values()}) == 1
    # every path kept, through the sparse code: exactly exact RTRL's run
    assert k_all["loss_all"] == pytest.approx(rtrl["loss_all"], rel=1e-9)
    assert frozen["loss_all"] > 1.5 * frozen["source_loss"]  # the drift shows
    assert all(np.isfinite(s["loss_final"]) for s in summaries.values())
    assert (tmp_path / "cache").is_dir()

    (row,) = study_rows(summaries, specs)
    assert row.claim == "C9" and row.synthetic
    assert "SYNTHETIC" in row.statement and "SYNTHETIC" in row.notes
    assert "frozen" in row.losses and "k=4" in row.losses


def write_falcon_day(path, date, seed):
    """A FALCON-like file whose channels fire with the finger velocity; the
    later day reorders and retunes the channels (electrode drift)."""
    rng = np.random.default_rng(seed)
    stamps = 1.0 + np.arange(300) * 0.02
    phase = np.cumsum(rng.uniform(0.05, 0.15, 300))
    vel = np.stack((np.sin(phase), np.cos(phase)))
    tuning = np.random.default_rng(0).standard_normal((10, 2))
    if date.day > 20:
        tuning = -tuning[::-1]  # channels reordered and retuned
    nwb = NWBFile(
        session_description="falcon-like",
        identifier=str(date),
        session_start_time=dt.datetime(*date.timetuple()[:3], tzinfo=dt.timezone.utc),
    )
    for channel in range(10):
        rate = 20 * np.exp(0.8 * tuning[channel] @ vel)  # Hz, per 20 ms bin
        counts = rng.poisson(rate * 0.02)
        times = np.concatenate(
            [
                t + np.sort(rng.uniform(0, 0.02, n))
                for t, n in zip(stamps, counts, strict=True)
            ]
        )
        nwb.add_unit(spike_times=times)
    finger = BehavioralTimeSeries(name="finger_vel")
    for name, series in zip(("index", "mrs"), vel, strict=True):
        finger.create_timeseries(name=name, data=series, unit="a.u.", timestamps=stamps)
    nwb.add_acquisition(finger)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_smoke_run_on_a_generated_nwb_recording(tmp_path):
    folder = tmp_path / "falcon"
    folder.mkdir()
    write_falcon_day(
        folder / "sub-N_ses-2020-10-28_behavior+ecephys.nwb", dt.date(2020, 10, 28), 2
    )
    write_falcon_day(
        folder / "sub-N_ses-2020-10-19_behavior+ecephys.nwb", dt.date(2020, 10, 19), 1
    )
    config = tiny("sparse_rtrl", num_paths=4)
    config["data"].update(path=str(folder), target_bins=120)

    summary = run_bci(config, 0, None)

    assert not summary["synthetic"]
    assert summary["data"]["data_kind"] == "falcon_m2"
    assert summary["data"]["source_date"] == "2020-10-19"
    assert summary["data"]["bins"] == {"train": 225, "held": 75, "target": 120}
    assert np.isfinite(summary["loss_final"]) and not summary["diverged"]


def test_one_session_is_a_clear_error(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    write_falcon_day(folder / "only.nwb", dt.date(2020, 10, 19), 1)
    config = tiny("frozen")
    config["data"]["path"] = str(folder)
    with pytest.raises(ValueError, match="at least two"):
        run_bci(config, 0, None)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dataclass_drift_round_trips_through_the_config():
    drift = dataclasses.asdict(Drift(gain_sd=0.1))
    config = resolve_bci({"data": {"synthetic": {"drift": drift}}})
    assert config["data"]["synthetic"]["drift"]["gain_sd"] == 0.1


def test_rows_count_diverged_runs_and_compute_recovery_per_seed():
    methods = {
        "frozen": ("frozen", {}),
        "rtrl": ("rtrl", {}),
        "k=4": ("sparse_rtrl", {"num_paths": 4}),
    }
    finals = {
        "frozen": [1.0, 2.0, 1.0],
        "rtrl": [0.5, 1.0, 0.5],
        "k=4": [0.6, 1.2, None],
    }
    specs, summaries = [], {}
    for label, (name, options) in methods.items():
        for seed, final in enumerate(finals[label]):
            spec = RunSpec(tiny(name, **options), seed)
            specs.append(spec)
            summaries[spec.run_id] = (
                {"status": "diverged", "diverged": True, "message": "step 9"}
                if final is None
                else {
                    "loss_final": final,
                    "loss_all": final,
                    "diverged": False,
                    "source_loss": 0.25,
                    "synthetic": True,
                }
            )

    (row,) = study_rows(summaries, specs)

    # recovery per seed: (1 - 0.6) / (1 - 0.5) = 0.8 and (2 - 1.2) / (2 - 1) = 0.8
    assert row.measured == "80 ± 0 %, 1/3 diverged"
    assert row.n_seeds == 3
    assert "frozen 1.333" in row.losses and "k=4 0.900 (+20%)" in row.losses
    assert "drift: frozen target loss / source held-out loss 5.33" in row.notes


def test_learning_rate_is_chosen_on_the_source_for_exact_rtrl(tmp_path, monkeypatch):
    monkeypatch.setitem(study.LR_SELECT, "steps", 40)
    config = tiny("sparse_rtrl", num_paths=4)
    config["optimizer"]["lr"] = None
    run_dir = tmp_path / "runs" / "one"
    run_dir.mkdir(parents=True)

    summary = run_bci(config, 0, run_dir)

    selection = summary["lr_selection"]
    scores = {float(lr): loss for lr, loss in selection["scores"].items()}
    assert set(scores) == set(selection["grid"])
    assert summary["lr"] == selection["lr"] == min(scores, key=scores.get)
    assert list((tmp_path / "cache").glob("bci-lr-*.json"))  # shared by methods


def test_full_study_reads_a_recording_named_by_the_environment(monkeypatch):
    monkeypatch.setenv(study.DATA_ENV, "/data/000953")
    assert {c["data"]["path"] for _, c, _ in study_configs(False)} == {"/data/000953"}
    assert {c["data"]["path"] for _, c, _ in study_configs(True)} == {None}
