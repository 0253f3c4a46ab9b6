r"""Readers for the public motor-cortex recordings the BCI experiment uses.

Three layouts, all read with h5py alone (pynwb is not needed to read):

- **FALCON M2** NWB files (DANDI 000953): `/units` with one threshold-crossing
  unit per channel, finger velocity in `/acquisition/finger_vel` (a
  BehavioralTimeSeries of 1-D TimeSeries, 20 ms timestamps).
- **NLB MC_Maze** NWB files (DANDI 000128, 000138, 000139, 000140): sorted
  units in `/units`, each linked to one of 192 electrodes through
  `units/electrodes`; `processing/behavior/hand_vel` at 1 kHz with gaps
  between trials. Units are summed per electrode, so every session has the
  same 192 inputs whatever units the sorter found.
- **O'Doherty and Sabes** MATLAB v7.3 files (Zenodo 583331): `t` (1, k),
  `cursor_pos` (2, k) (MATLAB arrays appear transposed through HDF5),
  `chan_names` and `spikes` as cell arrays of object references into
  `#refs#`, empty cells marked with the `MATLAB_empty` attribute. Velocity is
  `np.gradient(cursor_pos, t)`; the unsorted and sorted units of a channel are
  summed.

Every reader returns a `Session`: spike counts in bins of `bin_size` seconds
(20 ms by default) with a fixed channel order, the mean velocity over the
behaviour samples inside each bin, and the session date.

Binning. Bin i covers [t0 + i w, t0 + (i + 1) w) with t0 the first behaviour
timestamp and w = `bin_size`; a spike or behaviour sample goes to bin
floor((t - t0) / w + 1e-6) (the 1e-6 bin tolerance keeps samples stamped
exactly on a bin start, like FALCON's 20 ms timestamps, in that bin despite
rounding). Bins that hold no finite behaviour sample (the gaps between trials
of MC_Maze, NaN stretches) are dropped, so the stream joins the recorded
stretches end to end. Unlike falcon-challenge's `np.histogram` over the
timestamps, spikes that fall in a gap are not folded into the bin before it.

Limitations: `obs_intervals` and FALCON's `eval_mask` are not applied (every
bin with behaviour is used); a unit linked to several electrodes counts for
the first; MATLAB v5 files (not HDF5) are refused with a message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


DEFAULT_BIN_SIZE = 0.02
BIN_TOLERANCE = 1e-6  # in bins: see the module docstring

NWB_VELOCITY_FIELDS = (
    "acquisition/finger_vel",  # FALCON M2
    "processing/behavior/hand_vel",  # NLB MC_Maze
    "processing/behavior/finger_vel",  # NLB MC_RTT
    "acquisition/hand_vel",
    "processing/behavior/cursor_vel",
)
NWB_POSITION_FIELDS = (
    "processing/behavior/hand_pos",
    "processing/behavior/cursor_pos",
    "processing/behavior/finger_pos",
    "acquisition/finger_pos",
    "acquisition/cursor_pos",
)
ELECTRODES_TABLE = "general/extracellular_ephys/electrodes"
MAT_POSITION_FIELD = "cursor_pos"
SUFFIXES = (".nwb", ".mat")


class NeuralDataError(ValueError):
    """A recording file that cannot be read: the message names file and gap."""


@dataclasses.dataclass(frozen=True)
class Session:
    """One recording session, binned.

    Attributes:
        spikes: (T, C) float32 spike counts per bin and channel.
        velocity: (T, D) float64 velocity (mean over the bin's samples).
        channels: the C channel names, in column order.
        date: the recording date, or None when the file gives none.
        bin_size: bin width in seconds.
        source: the file the session came from ("synthetic:<seed>" otherwise).
        kind: "falcon_m2", "nlb_mc_maze", "nwb", "odoherty_sabes" or
            "synthetic".
    """

    spikes: np.ndarray
    velocity: np.ndarray
    channels: tuple[str, ...]
    date: dt.date | None
    bin_size: float
    source: str
    kind: str

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def num_bins(self) -> int:
        return self.spikes.shape[0]

    @property
    def num_channels(self) -> int:
        return self.spikes.shape[1]

    def aligned(self, channels: Sequence[str]) -> Session:
        """The session with its columns reordered to `channels`.

        A channel this session lacks becomes a column of zeros (a dead
        electrode); channels not listed are dropped.
        """
        position = {name: i for i, name in enumerate(self.channels)}
        spikes = np.zeros((self.num_bins, len(channels)), dtype=self.spikes.dtype)
        for column, name in enumerate(channels):
            if name in position:
                spikes[:, column] = self.spikes[:, position[name]]
        return dataclasses.replace(self, spikes=spikes, channels=tuple(channels))


# Entry points ---------------------------------------------------------------


def load_session(
    path: str | Path, *, bin_size: float = DEFAULT_BIN_SIZE, field: str | None = None
) -> Session:
    """Read one recording file (NWB or MATLAB v7.3) into a binned `Session`.

    Args:
        path: an `.nwb` file (FALCON M2, NLB MC_Maze or any NWB with a units
            table and a velocity or position series) or an O'Doherty-Sabes
            `.mat` (v7.3) file.
        bin_size: bin width in seconds (> 0).
        field: the behaviour series to decode, as an HDF5 path inside the file
            (e.g. "processing/behavior/cursor_pos"); a name ending in "_pos"
            is differentiated into a velocity. None picks the data set's
            velocity (module docstring).

    Raises:
        NeuralDataError: the file is missing, of an unknown format, or lacks
            what the reader needs (the message names the file and the part).
    """
    path = Path(path)
    if not bin_size > 0:
        raise ValueError(f"load_session: `bin_size` must be > 0 s, got {bin_size}.")
    if not path.is_file():
        raise NeuralDataError(f"{path}: no such file.")

    h5py = _import_h5py()
    kind = _sniff(path, h5py)
    with h5py.File(path, "r") as file:
        if kind == "nwb":
            return _read_nwb(file, path, bin_size, field)
        return _read_mat(file, path, bin_size, field or MAT_POSITION_FIELD)


def load_sessions(
    paths: str | Path | Iterable[str | Path],
    *,
    bin_size: float = DEFAULT_BIN_SIZE,
    field: str | None = None,
    merge_same_day: bool = True,
) -> list[Session]:
    """Read every recording under `paths`, earliest first.

    A folder is searched recursively for `.nwb` and `.mat` files; NLB test
    files (`desc-test` in the name: no behaviour) are skipped. Sessions are
    ordered by date, then file name; sessions without a date come last, in
    file-name order. With `merge_same_day`, runs recorded on the same day
    (FALCON's Run1, Run2) are joined end to end into one session.
    """
    files = _recording_files(paths)
    sessions = [load_session(f, bin_size=bin_size, field=field) for f in files]
    sessions.sort(key=lambda s: (s.date is None, s.date or dt.date.min, s.source))
    if merge_same_day:
        sessions = _merge_same_day(sessions)
    return sessions


# Binning -------------------------------------------------------------------


def bin_recording(
    unit_spikes: Sequence[np.ndarray],
    unit_channel: np.ndarray,
    num_channels: int,
    times: np.ndarray,
    values: np.ndarray,
    bin_size: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Spike counts per channel and mean behaviour per bin (module docstring).

    Args:
        unit_spikes: spike times (s) of each unit.
        unit_channel: (U,) the channel each unit adds into.
        num_channels: C.
        times: (N,) behaviour timestamps (s), increasing.
        values: (N, D) behaviour samples.
        bin_size: w (s).

    Returns:
        counts (T, C) float32 and behaviour (T, D) float64 for the bins that
        hold at least one finite behaviour sample.
    """
    start = times[0]
    num_bins = int(_bin_index(times[-1:], start, bin_size)[0]) + 1

    index = _bin_index(times, start, bin_size)
    finite = np.isfinite(values).all(axis=1)
    samples = np.bincount(index[finite], minlength=num_bins)
    behaviour = np.stack(
        [
            np.bincount(index[finite], weights=column[finite], minlength=num_bins)
            for column in values.T
        ],
        axis=1,
    )

    cells = [np.zeros(0, dtype=np.int64)]  # (bin, channel) flat index per spike
    for spikes, channel in zip(unit_spikes, unit_channel, strict=True):
        bins = _bin_index(np.asarray(spikes, dtype=np.float64), start, bin_size)
        cells.append(bins[(bins >= 0) & (bins < num_bins)] * num_channels + channel)
    counts = np.bincount(np.concatenate(cells), minlength=num_bins * num_channels)

    keep = samples > 0
    counts = counts.reshape(num_bins, num_channels)[keep].astype(np.float32)
    return counts, behaviour[keep] / samples[keep, None]


def _bin_index(times: np.ndarray, start: float, bin_size: float) -> np.ndarray:
    return np.floor((times - start) / bin_size + BIN_TOLERANCE).astype(np.int64)


# NWB -----------------------------------------------------------------------


def _read_nwb(file, path: Path, bin_size: float, field: str | None) -> Session:
    unit_spikes = _nwb_unit_spikes(file, path)
    unit_channel, channels = _nwb_channels(file, path, len(unit_spikes))
    field = field or _first_present(file, NWB_VELOCITY_FIELDS + NWB_POSITION_FIELDS)
    if field is None:
        raise NeuralDataError(
            f"{path}: no behaviour found; looked for "
            f"{', '.join(NWB_VELOCITY_FIELDS + NWB_POSITION_FIELDS)}. "
            "Pass `field` (--set data.field=...) with the series to decode; NLB "
            "'desc-test' files hold no behaviour."
        )
    times, values = _nwb_series(file, path, field)
    if Path(field).name.endswith("_pos"):
        values = _velocity(times, values)

    counts, velocity = bin_recording(
        unit_spikes, unit_channel, len(channels), times, values, bin_size
    )
    return Session(
        spikes=counts,
        velocity=velocity,
        channels=channels,
        date=_nwb_date(file),
        bin_size=bin_size,
        source=str(path),
        kind=_nwb_kind(file),
    )


def _nwb_unit_spikes(file, path: Path) -> list[np.ndarray]:
    """Unit i's spikes: spike_times[end[i-1]:end[i]] (the ragged-array index)."""
    times = _need(file, "units/spike_times", path, "the units table's spike times")
    ends = _need(file, "units/spike_times_index", path, "the spike-time index")
    times, ends = np.asarray(times[()], dtype=np.float64), np.asarray(ends[()])
    if ends.size == 0:
        raise NeuralDataError(f"{path}: the units table has no units.")
    if ends[-1] != times.size or np.any(np.diff(ends.astype(np.int64)) < 0):
        raise NeuralDataError(
            f"{path}: `units/spike_times_index` does not match `units/spike_times` "
            f"(last end {int(ends[-1])}, {times.size} spike times); the file is "
            "damaged."
        )
    _check_finite_spikes(times, path, "units/spike_times")
    starts = np.concatenate(([0], ends[:-1]))
    return [times[a:b] for a, b in zip(starts, ends, strict=True)]


def _check_finite_spikes(times: np.ndarray, path: Path, where: str) -> None:
    bad = int(np.size(times) - np.isfinite(times).sum())
    if bad:
        raise NeuralDataError(
            f"{path}: `{where}` holds {bad} non-finite spike time(s) (NaN or "
            "inf); the file is damaged or was written with missing values."
        )


def _nwb_channels(file, path: Path, num_units: int) -> tuple[np.ndarray, tuple]:
    """Each unit's channel, and the channel names.

    With `units/electrodes` every electrode row of the electrodes table is a
    channel (units summed into it, zeros where none); without it every unit is
    a channel.
    """
    if "units/electrodes" not in file:
        ids = _column(file, "units/id", num_units)
        return np.arange(num_units), tuple(f"unit {i}" for i in ids)

    region = np.asarray(file["units/electrodes"][()], dtype=np.int64)
    if "units/electrodes_index" in file:  # ragged: a unit's first electrode
        ends = np.asarray(file["units/electrodes_index"][()], dtype=np.int64)
        region = region[np.concatenate(([0], ends[:-1]))]
    if region.size != num_units:
        raise NeuralDataError(
            f"{path}: `units/electrodes` links {region.size} units, the units table "
            f"has {num_units}; the file is damaged."
        )
    table = _need(file, ELECTRODES_TABLE, path, "the electrodes table")
    ids = _column(file, f"{ELECTRODES_TABLE}/id", None)
    if region.size and (region.min() < 0 or region.max() >= len(ids)):
        raise NeuralDataError(
            f"{path}: `units/electrodes` points past the {len(ids)} rows of "
            f"{ELECTRODES_TABLE}."
        )
    groups = (
        [_text(g) for g in table["group_name"][()]]
        if "group_name" in table
        else ["electrode"] * len(ids)
    )
    return region, tuple(f"{g} {i}" for g, i in zip(groups, ids, strict=True))


def _nwb_series(file, path: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,) timestamps and (N, D) samples of a TimeSeries or a container of them.

    A container (BehavioralTimeSeries, Position) holds several TimeSeries on
    the same timestamps; their columns are joined in name order.
    """
    node = _need(file, field, path, "the behaviour series")
    if hasattr(node, "shape") or "data" in node:
        return _nwb_timeseries(node, path, field)
    parts = [_nwb_timeseries(node[name], path, f"{field}/{name}") for name in node]
    if not parts:
        raise NeuralDataError(f"{path}: `{field}` holds no TimeSeries.")
    times = parts[0][0]
    for (other, _), name in zip(parts[1:], list(node)[1:], strict=True):
        if other.shape != times.shape or not np.allclose(other, times):
            raise NeuralDataError(
                f"{path}: the series in `{field}` do not share timestamps "
                f"(`{name}` differs from the first)."
            )
    return times, np.concatenate([values for _, values in parts], axis=1)


def _nwb_timeseries(node, path: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(node, "shape"):
        raise NeuralDataError(f"{path}: `{field}` is a dataset, not a TimeSeries.")
    data = _need(node, "data", path, f"the data of `{field}`")
    values = np.asarray(data[()], dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values.reshape(len(values), -1)
    if "timestamps" in node:
        times = np.asarray(node["timestamps"][()], dtype=np.float64)
    elif "starting_time" in node:
        start = node["starting_time"]
        rate = float(start.attrs.get("rate", np.nan))
        times = float(start[()]) + np.arange(len(values)) / rate
    else:
        raise NeuralDataError(
            f"{path}: `{field}` has neither `timestamps` nor `starting_time`."
        )
    if times.shape != (len(values),):
        raise NeuralDataError(
            f"{path}: `{field}` has {len(values)} samples but {times.size} "
            "timestamps; the lengths must match."
        )
    if len(values) < 2:
        raise NeuralDataError(f"{path}: `{field}` has fewer than 2 samples.")
    return times, values


def _nwb_kind(file) -> str:
    if "acquisition/finger_vel" in file:
        return "falcon_m2"
    if "processing/behavior/hand_vel" in file:
        return "nlb_mc_maze"
    return "nwb"


def _nwb_date(file) -> dt.date | None:
    if "session_start_time" not in file:
        return None
    try:
        return dt.datetime.fromisoformat(_text(file["session_start_time"][()])).date()
    except ValueError:
        return None


# MATLAB v7.3 ---------------------------------------------------------------


def _read_mat(file, path: Path, bin_size: float, field: str) -> Session:
    times = _mat_array(file, path, "t").ravel()
    position = _mat_array(file, path, field)
    position = position.T if position.shape[-1] == times.size else position
    if position.shape[0] != times.size:
        raise NeuralDataError(
            f"{path}: `{field}` has shape {_matlab_shape(position)} but `t` has "
            f"{times.size} samples; their lengths must match."
        )
    channels = _mat_channel_names(file, path)
    unit_spikes, unit_channel = _mat_spikes(file, path, len(channels))

    counts, velocity = bin_recording(
        unit_spikes,
        unit_channel,
        len(channels),
        times,
        _velocity(times, position),
        bin_size,
    )
    return Session(
        spikes=counts,
        velocity=velocity,
        channels=channels,
        date=_date_from_name(path.name),
        bin_size=bin_size,
        source=str(path),
        kind="odoherty_sabes",
    )


def _mat_array(file, path: Path, name: str) -> np.ndarray:
    node = _need(file, name, path, f"the variable `{name}`")
    if not hasattr(node, "shape") or node.attrs.get("MATLAB_empty", 0):
        raise NeuralDataError(f"{path}: `{name}` is empty or not a numeric array.")
    return np.asarray(node[()], dtype=np.float64)


def _mat_channel_names(file, path: Path) -> tuple[str, ...]:
    refs = _mat_refs(file, path, "chan_names")
    return tuple(_mat_string(file[ref]) for ref in refs.ravel())


def _mat_spikes(file, path: Path, num_channels: int) -> tuple[list, np.ndarray]:
    """Spike times of every (unit, channel) cell, and each one's channel.

    Through h5py the MATLAB cell `spikes` (channels x units) reads as
    (units, channels); row 0 is the unsorted ("hash") unit. Both are summed.
    """
    refs = _mat_refs(file, path, "spikes")
    if refs.ndim != 2 or num_channels not in refs.shape:
        raise NeuralDataError(
            f"{path}: `spikes` is a {_matlab_shape(refs)} cell but `chan_names` "
            f"lists {num_channels} channels; one side of `spikes` must match."
        )
    refs = refs if refs.shape[1] == num_channels else refs.T
    unit_spikes, unit_channel = [], []
    for unit_row in refs:
        for channel, ref in enumerate(unit_row):
            node = file[ref]
            if node.attrs.get("MATLAB_empty", 0) or node.size == 0:
                continue
            unit_spikes.append(np.asarray(node[()], dtype=np.float64).ravel())
            _check_finite_spikes(unit_spikes[-1], path, "spikes")
            unit_channel.append(channel)
    return unit_spikes, np.asarray(unit_channel, dtype=np.int64)


def _mat_refs(file, path: Path, name: str) -> np.ndarray:
    import h5py

    node = _need(file, name, path, f"the cell array `{name}`")
    if not hasattr(node, "dtype") or h5py.check_dtype(ref=node.dtype) is None:
        raise NeuralDataError(
            f"{path}: `{name}` is not a cell array of object references "
            "(MATLAB v7.3 layout expected)."
        )
    return node[()]


def _mat_string(node) -> str:
    if node.attrs.get("MATLAB_empty", 0):
        return ""
    return "".join(map(chr, np.asarray(node[()]).ravel(order="F")))


def _matlab_shape(array: np.ndarray) -> str:
    return "x".join(str(n) for n in array.shape[::-1]) + " (MATLAB order)"


# Shared helpers --------------------------------------------------------------


def _velocity(times: np.ndarray, position: np.ndarray) -> np.ndarray:
    """d position / dt, by np.gradient within each stretch without a gap.

    A gap (a step over 1.5 times the median step, e.g. between NLB trials)
    splits the series: differences are never taken across it. A stretch of
    one sample has no velocity (NaN, so its bin is dropped).
    """
    steps = np.diff(times)
    cuts = np.flatnonzero(steps > 1.5 * np.median(steps)) + 1
    velocity = np.full_like(position, np.nan)
    for part in np.split(np.arange(times.size), cuts):
        if part.size > 1:
            velocity[part] = np.gradient(position[part], times[part], axis=0)
    return velocity


def _need(node, key: str, path: Path, what: str):
    if key not in node:
        where = node.name.rstrip("/") + "/" + key
        raise NeuralDataError(
            f"{path}: missing `{where.lstrip('/')}` ({what}); the file does not "
            "have the layout this reader expects."
        )
    return node[key]


def _column(file, key: str, size: int | None) -> list:
    if key in file:
        return [_text(v) for v in file[key][()]]
    return list(range(size or 0))


def _first_present(file, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in file), None)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _date_from_name(name: str) -> dt.date | None:
    match = re.search(r"(\d{4})-?(\d{2})-?(\d{2})", name)
    if match is None:
        return None
    try:
        return dt.date(*map(int, match.groups()))
    except ValueError:
        return None


def _sniff(path: Path, h5py) -> str:
    """ "nwb" or "mat", from the suffix and the HDF5 content."""
    if not h5py.is_hdf5(path):
        with open(path, "rb") as handle:
            head = handle.read(128)
        if head.startswith(b"MATLAB 5.0"):
            raise NeuralDataError(
                f"{path}: a MATLAB v5 file; only v7.3 (HDF5) files are read. "
                "Resave it in MATLAB with save(name, '-v7.3')."
            )
        raise NeuralDataError(
            f"{path}: unknown format (not HDF5); expected an NWB file or a "
            "MATLAB v7.3 .mat file."
        )
    with h5py.File(path, "r") as file:
        if "units" in file or "session_start_time" in file or "acquisition" in file:
            return "nwb"
        if "chan_names" in file or "spikes" in file:
            return "mat"
    raise NeuralDataError(
        f"{path}: unknown format: an HDF5 file with neither an NWB `units` table "
        "nor the MATLAB variables `spikes` and `chan_names`."
    )


def _recording_files(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(f for f in entry.rglob("*") if f.suffix.lower() in SUFFIXES)
            files += [f for f in found if "desc-test" not in f.name]
        else:
            files.append(entry)
    if not files:
        raise NeuralDataError(
            f"{', '.join(map(str, paths))}: no .nwb or .mat recording found."
        )
    return files


def _merge_same_day(sessions: list[Session]) -> list[Session]:
    merged: list[Session] = []
    for session in sessions:
        last = merged[-1] if merged else None
        if last is None or session.date is None or session.date != last.date:
            merged.append(session)
            continue
        aligned = session.aligned(last.channels)
        merged[-1] = dataclasses.replace(
            last,
            spikes=np.concatenate((last.spikes, aligned.spikes)),
            velocity=np.concatenate((last.velocity, aligned.velocity)),
            source=f"{last.source};{session.source}",
        )
    return merged


def _import_h5py():
    try:
        import h5py
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "Reading recordings needs h5py: pip install 'sparse-rtrl[bci]'."
        ) from error
    return h5py
