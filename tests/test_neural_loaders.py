"""The recording loaders, on small files written by independent writers.

NWB files are written with pynwb (FALCON M2 and NLB MC_Maze layouts), MATLAB
v7.3 files by hand with h5py and with hdf5storage (O'Doherty-Sabes layout).
Expected bin counts and velocities are computed here, with loops over integer
sample indices, never through the loaders' own code.
"""

import datetime as dt

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries, Position

from sparse_rtrl.experiments.neural import (
    NeuralDataError,
    load_session,
    load_sessions,
)


BIN = 0.02
TOL = 1e-12  # velocities: sums of a few float64 samples


def _nwb_file(date: dt.date) -> NWBFile:
    start = dt.datetime(date.year, date.month, date.day, 10, tzinfo=dt.timezone.utc)
    return NWBFile(
        session_description="test", identifier=str(date), session_start_time=start
    )


def _write(nwb: NWBFile, path) -> None:
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def _uniform_spikes(rng, num_units, low, high, rate=40.0):
    return [
        np.sort(rng.uniform(low, high, rng.poisson(rate * (high - low))))
        for _ in range(num_units)
    ]


# FALCON M2 -----------------------------------------------------------------


def write_falcon(path, *, seed=0, date=dt.date(2020, 10, 19), units=True):
    """96 -> 5 channels, finger_vel on 20 ms timestamps, two runs 1 s apart."""
    rng = np.random.default_rng(seed)
    start = 3.0
    steps = np.concatenate((np.arange(40), np.arange(90, 130)))  # 20 ms steps
    stamps = start + steps * BIN
    index_vel, mrs_vel = rng.standard_normal((2, steps.size))
    spikes = _uniform_spikes(rng, 5, start - 0.5, stamps[-1] + 0.5)

    nwb = _write_units_and_trials(_nwb_file(date), spikes, units)
    finger = BehavioralTimeSeries(name="finger_vel")
    finger.create_timeseries(
        name="index", data=index_vel, unit="a.u.", timestamps=stamps
    )
    finger.create_timeseries(name="mrs", data=mrs_vel, unit="a.u.", timestamps=stamps)
    nwb.add_acquisition(finger)
    nwb.add_acquisition(
        TimeSeries(
            name="eval_mask",
            data=np.ones(steps.size, bool),
            unit="n/a",
            timestamps=stamps,
        )
    )
    _write(nwb, path)
    return stamps, np.stack((index_vel, mrs_vel), axis=1), spikes


def _write_units_and_trials(nwb, spikes, units):
    if units:
        for times in spikes:
            nwb.add_unit(spike_times=times, obs_intervals=[[0.0, 100.0]])
    nwb.add_trial_column(name="trial_num", description="trial number")
    nwb.add_trial(start_time=3.0, stop_time=3.8, trial_num=0)
    nwb.add_trial(start_time=4.8, stop_time=5.6, trial_num=1)
    return nwb


def test_falcon_bins_follow_the_behaviour_timestamps(tmp_path):
    path = tmp_path / "sub-MonkeyN_ses-2020-10-19-Run1_behavior+ecephys.nwb"
    stamps, velocity, spikes = write_falcon(path)

    session = load_session(path)

    # bin j counts spikes in [stamp_j, stamp_j + 20 ms): the FALCON convention
    expected = np.array(
        [[np.sum((s >= t) & (s < t + BIN)) for s in spikes] for t in stamps]
    )
    assert session.kind == "falcon_m2"
    assert session.date == dt.date(2020, 10, 19)
    assert session.channels == tuple(f"unit {i}" for i in range(5))
    np.testing.assert_array_equal(session.spikes, expected)
    np.testing.assert_allclose(session.velocity, velocity, rtol=0, atol=TOL)
    assert session.spikes.sum() < sum(s.size for s in spikes)  # gap spikes left out


# NLB MC_Maze ----------------------------------------------------------------

MAZE_ELECTRODES = 6
MAZE_UNIT_ELECTRODE = [0, 0, 2, 3, 3]  # electrodes 1, 4 and 5 have no unit


def write_maze(path, *, seed=0, date=dt.date(2009, 9, 18), unit_electrode=None):
    """Sorted units on 6 electrodes (M1, PMd), hand_vel at 1 kHz, two trials."""
    unit_electrode = MAZE_UNIT_ELECTRODE if unit_electrode is None else unit_electrode
    rng = np.random.default_rng(seed)
    nwb = _nwb_file(date)
    device = nwb.create_device("array")
    for e in range(MAZE_ELECTRODES):
        name = "electrode_group_M1" if e < 3 else "electrode_group_PMd"
        if name not in nwb.electrode_groups:
            nwb.create_electrode_group(
                name, description=name, location=name, device=device
            )
        nwb.add_electrode(group=nwb.electrode_groups[name], location=name)

    start = 10.0
    ms = np.concatenate((np.arange(700), np.arange(1500, 2100)))  # gap, in ms
    stamps = start + ms / 1000
    vel = rng.standard_normal((ms.size, 2)) * 50
    pos = np.cumsum(vel, axis=0) / 1000
    spikes = _uniform_spikes(rng, len(unit_electrode), start, stamps[-1] + 0.2)

    nwb.add_unit_column(name="heldout", description="held-out neuron")
    for times, electrode in zip(spikes, unit_electrode, strict=True):
        nwb.add_unit(
            spike_times=times,
            electrodes=[electrode],
            heldout=False,
            obs_intervals=[[start, stamps[-1]]],
        )
    for column in ("move_onset_time", "split"):
        nwb.add_trial_column(name=column, description=column)
    nwb.add_trial(
        start_time=start,
        stop_time=start + 0.7,
        move_onset_time=start + 0.3,
        split="train",
    )
    nwb.add_trial(
        start_time=start + 1.5,
        stop_time=start + 2.1,
        move_onset_time=start + 1.8,
        split="val",
    )

    behavior = nwb.create_processing_module("behavior", "behaviour")
    behavior.add(TimeSeries(name="hand_vel", data=vel, unit="mm/s", timestamps=stamps))
    hand = Position(name="hand_pos")
    hand.create_spatial_series(
        name="hand_pos", data=pos, timestamps=stamps, reference_frame="screen"
    )
    behavior.add(hand)
    _write(nwb, path)
    return start, ms, vel, spikes, unit_electrode


def expected_maze(start, ms, vel, spikes, unit_electrode):
    """Bin k holds samples with ms // 20 == k; spikes summed per electrode."""
    bins = sorted(set(ms // 20))
    counts = np.zeros((len(bins), MAZE_ELECTRODES))
    means = np.zeros((len(bins), 2))
    for row, k in enumerate(bins):
        means[row] = vel[ms // 20 == k].mean(axis=0)
        low, high = start + k * BIN, start + (k + 1) * BIN
        for times, electrode in zip(spikes, unit_electrode, strict=True):
            counts[row, electrode] += np.sum((times >= low) & (times < high))
    return counts, means


def test_mc_maze_sums_units_per_electrode_and_averages_velocity(tmp_path):
    path = tmp_path / "sub-Jenkins_ses-small_desc-train_behavior+ecephys.nwb"
    written = write_maze(path)

    session = load_session(path)

    counts, means = expected_maze(*written)
    assert session.kind == "nlb_mc_maze"
    assert session.date == dt.date(2009, 9, 18)
    assert session.num_channels == MAZE_ELECTRODES
    assert session.channels[0] == "electrode_group_M1 0"
    assert session.channels[5] == "electrode_group_PMd 5"
    np.testing.assert_array_equal(session.spikes, counts)
    np.testing.assert_allclose(session.velocity, means, rtol=0, atol=TOL)
    assert not session.spikes[:, [1, 4, 5]].any()


def test_mc_maze_position_field_gives_the_gradient(tmp_path):
    path = tmp_path / "maze.nwb"
    start, ms, vel, *_ = write_maze(path)

    session = load_session(path, field="processing/behavior/hand_pos")

    pos = np.cumsum(vel, axis=0) / 1000
    grad = np.empty_like(pos)  # central differences within each trial
    for trial in (ms < 1000, ms >= 1000):
        p, t = pos[trial], (start + ms[trial] / 1000)[:, None]
        g = np.empty_like(p)
        g[1:-1] = (p[2:] - p[:-2]) / (t[2:] - t[:-2])
        g[0], g[-1] = (p[1] - p[0]) / (t[1] - t[0]), (p[-1] - p[-2]) / (t[-1] - t[-2])
        grad[trial] = g
    bins = sorted(set(ms // 20))
    means = np.array([grad[ms // 20 == k].mean(axis=0) for k in bins])
    np.testing.assert_allclose(session.velocity, means, rtol=1e-9, atol=1e-9)


def test_sessions_sorted_by_date_with_a_fixed_channel_layout(tmp_path):
    write_maze(
        tmp_path / "a_late.nwb",
        seed=1,
        date=dt.date(2009, 10, 6),
        unit_electrode=[5, 1, 1],
    )
    write_maze(tmp_path / "b_early.nwb", seed=2, date=dt.date(2009, 9, 18))
    write_maze(tmp_path / "c_desc-test_ecephys.nwb", seed=3)  # skipped

    sessions = load_sessions(tmp_path)

    assert [s.date for s in sessions] == [dt.date(2009, 9, 18), dt.date(2009, 10, 6)]
    assert sessions[0].channels == sessions[1].channels
    assert sessions[1].spikes[:, 1].sum() > 0 and not sessions[1].spikes[:, 0].any()


def test_same_day_runs_are_joined(tmp_path):
    write_falcon(tmp_path / "run1.nwb", seed=1)
    write_falcon(tmp_path / "run2.nwb", seed=2)
    write_falcon(tmp_path / "later.nwb", seed=3, date=dt.date(2020, 11, 3))

    sessions = load_sessions(tmp_path)

    assert [s.num_bins for s in sessions] == [160, 80]
    assert "run1.nwb" in sessions[0].source and "run2.nwb" in sessions[0].source


# O'Doherty-Sabes MATLAB v7.3 ---------------------------------------------------

CHANNELS = ["M1 001", "M1 002", "M1 003"]
MAT_HEADER = (
    b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 ."
)


def indy_content(seed=0, samples=60):
    """t at 250 Hz, cursor_pos, and spikes[unit][channel] (None = empty cell)."""
    rng = np.random.default_rng(seed)
    t = 100.0 + np.arange(samples) * 0.004
    pos = np.cumsum(rng.standard_normal((samples, 2)), axis=0)
    spikes = [
        [rng.uniform(t[0], t[-1], n) for n in (30, 0, 12)],  # row 0: unsorted
        [rng.uniform(t[0], t[-1], 9), None, None],
    ]
    spikes[0][1] = None
    return t, pos, spikes


def write_indy_h5py(path, t, pos, spikes, *, drop=()):
    """The v7.3 layout by hand: transposed arrays, `#refs#`, MATLAB_empty cells."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        ref_dtype = h5py.special_dtype(ref=h5py.Reference)

        def put(name, data, matlab_class, empty=False):
            ds = refs.create_dataset(name, data=data)
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            if empty:
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            return ds.ref

        name_refs = np.empty((1, len(CHANNELS)), dtype=object)
        for i, name in enumerate(CHANNELS):
            codes = np.array([[ord(c)] for c in name], dtype=np.uint16)  # (6, 1)
            name_refs[0, i] = put(f"n{i}", codes, "char")
        spike_refs = np.empty((len(spikes), len(CHANNELS)), dtype=object)
        for u, row in enumerate(spikes):
            for c, times in enumerate(row):
                if times is None:
                    spike_refs[u, c] = put(
                        f"s{u}_{c}", np.zeros(2, np.uint64), "double", empty=True
                    )
                else:
                    spike_refs[u, c] = put(f"s{u}_{c}", times[None, :], "double")

        variables = {
            "t": t[None, :],
            "cursor_pos": pos.T,
            "chan_names": name_refs,
            "spikes": spike_refs,
        }
        for name, data in variables.items():
            if name in drop:
                continue
            kind = ref_dtype if data.dtype == object else data.dtype
            ds = f.create_dataset(name, data=data, dtype=kind)
            ds.attrs["MATLAB_class"] = np.bytes_(
                "cell" if data.dtype == object else "double"
            )
    with open(path, "r+b") as handle:
        handle.write(MAT_HEADER.ljust(128, b" "))


def expected_indy(t, pos, spikes):
    """Velocity by hand (uniform 4 ms steps), 5 samples per 20 ms bin."""
    vel = np.empty_like(pos)
    vel[1:-1] = (pos[2:] - pos[:-2]) / (2 * 0.004)
    vel[0], vel[-1] = (pos[1] - pos[0]) / 0.004, (pos[-1] - pos[-2]) / 0.004
    sample_bin = np.arange(t.size) // 5
    num_bins = sample_bin[-1] + 1
    means = np.array([vel[sample_bin == k].mean(axis=0) for k in range(num_bins)])
    counts = np.zeros((num_bins, len(CHANNELS)))
    for row in spikes:
        for c, times in enumerate(row):
            for s in [] if times is None else times:
                counts[int((s - t[0]) // BIN), c] += 1
    return counts, means


def test_indy_mat_written_by_hand(tmp_path):
    path = tmp_path / "indy_20160407_02.mat"
    content = indy_content()
    write_indy_h5py(path, *content)

    session = load_session(path)

    counts, means = expected_indy(*content)
    assert session.kind == "odoherty_sabes"
    assert session.channels == tuple(CHANNELS)
    assert session.date == dt.date(2016, 4, 7)
    np.testing.assert_array_equal(session.spikes, counts)
    np.testing.assert_allclose(session.velocity, means, rtol=1e-9, atol=1e-9)


def test_indy_mat_written_by_hdf5storage(tmp_path):
    hdf5storage = pytest.importorskip("hdf5storage")
    path = tmp_path / "loco_20170210_03.mat"
    t, pos, spikes = indy_content(seed=4)
    cells = np.empty((len(CHANNELS), len(spikes)), dtype=object)  # MATLAB: chan x unit
    for u, row in enumerate(spikes):
        for c, times in enumerate(row):
            cells[c, u] = np.zeros((0, 0)) if times is None else times[None, :]
    names = np.empty((len(CHANNELS), 1), dtype=object)
    for i, name in enumerate(CHANNELS):
        names[i, 0] = np.str_(name)
    hdf5storage.savemat(
        str(path),
        {"t": t[:, None], "cursor_pos": pos, "spikes": cells, "chan_names": names},
        format="7.3",
    )

    session = load_session(path)

    counts, means = expected_indy(t, pos, spikes)
    assert session.channels == tuple(CHANNELS)
    assert session.date == dt.date(2017, 2, 10)
    np.testing.assert_array_equal(session.spikes, counts)
    np.testing.assert_allclose(session.velocity, means, rtol=1e-9, atol=1e-9)


# Malformed files ---------------------------------------------------------------


def _no_units_nwb(path):
    nwb = _nwb_file(dt.date(2020, 1, 1))
    nwb.add_acquisition(
        TimeSeries(
            name="finger_vel", data=np.zeros(5), unit="a", timestamps=np.arange(5) * BIN
        )
    )
    _write(nwb, path)


def _edit(path, key, data):
    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, data=data)


def _maze_then(edit):
    def make(path):
        write_maze(path)
        edit(path)

    return make


MALFORMED = {
    "no units table": (_no_units_nwb, "units/spike_times"),
    "no behaviour": (
        _maze_then(lambda p: _delete(p, "processing/behavior")),
        "no behaviour",
    ),
    "mismatched lengths": (
        _maze_then(
            lambda p: _edit(
                p, "processing/behavior/hand_vel/timestamps", np.arange(10.0)
            )
        ),
        "samples but 10 timestamps",
    ),
    "no units": (
        _maze_then(
            lambda p: _edit(p, "units/spike_times_index", np.zeros(0, np.int64))
        ),
        "no units",
    ),
    "damaged spike index": (
        _maze_then(
            lambda p: _edit(p, "units/spike_times_index", np.array([1, 2, 3, 4, 10**6]))
        ),
        "does not match",
    ),
    "mat without chan_names": (
        lambda p: write_indy_h5py(p, *indy_content(), drop=("chan_names",)),
        "chan_names",
    ),
    "mat with short cursor_pos": (
        lambda p: (
            write_indy_h5py(p, *indy_content()),
            _edit(p, "cursor_pos", np.zeros((2, 7))),
        ),
        "lengths must match",
    ),
    "unknown format (text)": (
        lambda p: p.write_text("not a recording"),
        "unknown format",
    ),
    "unknown format (other HDF5)": (
        lambda p: h5py.File(p, "w").create_dataset("x", data=[1]).file.close(),
        "unknown format",
    ),
    "MATLAB v5": (
        lambda p: p.write_bytes(b"MATLAB 5.0 MAT-file, Platform: x".ljust(256)),
        "v7.3",
    ),
}


def _delete(path, key):
    with h5py.File(path, "r+") as f:
        del f[key]


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_a_clear_error(tmp_path, case):
    make, message = MALFORMED[case]
    path = tmp_path / "broken_file.nwb"
    make(path)

    with pytest.raises(NeuralDataError, match=message) as info:
        load_session(path)

    assert "broken_file.nwb" in str(info.value)
    assert not isinstance(info.value, KeyError)


def test_missing_path_and_bad_bin_size(tmp_path):
    with pytest.raises(NeuralDataError, match="no such file"):
        load_session(tmp_path / "absent.nwb")
    with pytest.raises(NeuralDataError, match="no .nwb or .mat"):
        load_sessions(tmp_path)
    write_falcon(tmp_path / "ok.nwb")
    with pytest.raises(ValueError, match="bin_size"):
        load_session(tmp_path / "ok.nwb", bin_size=0)


def test_aligned_zero_fills_missing_channels(tmp_path):
    write_falcon(tmp_path / "f.nwb")
    session = load_session(tmp_path / "f.nwb")

    aligned = session.aligned(["unit 3", "nowhere", "unit 0"])

    np.testing.assert_array_equal(aligned.spikes[:, 0], session.spikes[:, 3])
    np.testing.assert_array_equal(aligned.spikes[:, 2], session.spikes[:, 0])
    assert not aligned.spikes[:, 1].any()
