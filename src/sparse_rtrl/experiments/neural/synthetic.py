r"""A synthetic multi-session recording with electrode drift between sessions.

Stands in for a real recording when none is given. Every session it makes is
labelled `kind="synthetic"`, and the study carries that label into its run
folders, report rows and figures.

The model, with L latent dimensions, C channels, D velocity dimensions and
bins of w seconds:

    (1) z_t = A z_{t-1} + sqrt(1 - r^2) eps_t,    eps_t ~ N(0, I_L)
    (2) v_t = V z_t                                  (D,) velocity
    (3) log lambda_{c,t} = b_c + g_c (W z_t)_c        (log rate, Hz)
    (4) n_{c,t} ~ Poisson(w lambda_{c,t})            spike count

A is block-diagonal: L/2 damped rotations of radius r (0.98 per bin) at
frequencies between 0.3 and 1.5 Hz, so z is stationary with unit variance,
smooth like reaching movements. V and W are Gaussian; the rows of V are
scaled so each velocity component has unit variance. Baseline rates e^{b_c}
lie between 5 and 30 Hz and gains g_c between 0.4 and 0.8.

Session drift. The first session uses the parameters as drawn; each later
session perturbs the previous one's channel map (the latent dynamics and the
velocity map V stay the same; only the electrodes change):

- gain change: g_c <- g_c exp(gain_sd xi_c), xi_c ~ N(0, 1);
- baseline shift: b_c <- b_c + baseline_sd zeta_c, zeta_c ~ N(0, 1);
- dropped channels: a fraction `drop_fraction` of the live channels goes
  silent (rate 0) and stays so;
- swapped channels: a fraction `swap_fraction` of the channels is split into
  pairs whose columns trade places (what an electrode remap looks like).

Everything is drawn from `numpy.random.SeedSequence(seed)` spawns (one for the
parameters, one per session's drift, one per session's stream), so the same
seed gives the same sessions, and changing a session's length does not change
the channel maps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np

from .loaders import DEFAULT_BIN_SIZE, Session


FIRST_DATE = dt.date(2020, 1, 6)
RADIUS = 0.98  # per-bin decay of the latent rotations
MAX_LOG_RATE = 6.0  # cap on log lambda (400 Hz): keeps Poisson draws sane


@dataclasses.dataclass(frozen=True)
class Drift:
    """How much each later session's electrodes change (module docstring)."""

    gain_sd: float = 0.3
    baseline_sd: float = 0.3
    drop_fraction: float = 0.1
    swap_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("gain_sd", "baseline_sd"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"Drift: `{name}` must be >= 0, got {getattr(self, name)}."
                )
        for name in ("drop_fraction", "swap_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"Drift: `{name}` must be in [0, 1], got {getattr(self, name)}."
                )


@dataclasses.dataclass
class _ChannelMap:
    """Eq. (3)'s per-channel parameters and the column order."""

    baseline: np.ndarray  # (C,) b_c
    gain: np.ndarray  # (C,) g_c
    live: np.ndarray  # (C,) bool, False once dropped
    order: np.ndarray  # (C,) column c shows channel order[c]


def make_sessions(
    num_sessions: int = 2,
    *,
    num_bins: int | list[int] = 3000,
    num_channels: int = 96,
    latent_size: int = 6,
    velocity_size: int = 2,
    bin_size: float = DEFAULT_BIN_SIZE,
    drift: Drift | dict | None = None,
    days_between: int = 7,
    seed: int = 0,
) -> list[Session]:
    """Sessions of a synthetic recording, earliest first (module docstring).

    Args:
        num_sessions: how many sessions (>= 1).
        num_bins: bins per session (one int for all, or one per session).
        num_channels: C.
        latent_size: L (even, >= 2).
        velocity_size: D.
        bin_size: w in seconds.
        drift: a `Drift` (or its fields as a dict); None: the defaults.
        days_between: days from one session's date to the next.
        seed: the only source of randomness.
    """
    lengths = _session_lengths(num_sessions, num_bins)
    _check_sizes(num_channels, latent_size, velocity_size, bin_size)
    drift = Drift(**drift) if isinstance(drift, dict) else (drift or Drift())

    params_seq, *rest = np.random.SeedSequence(seed).spawn(1 + 2 * num_sessions)
    rng = np.random.default_rng(params_seq)
    dynamics = _rotations(rng, latent_size, bin_size)
    readout = _velocity_map(rng, velocity_size, latent_size)
    tuning = rng.standard_normal((num_channels, latent_size)) / np.sqrt(latent_size)
    channel_map = _ChannelMap(
        baseline=np.log(rng.uniform(5.0, 30.0, num_channels)),
        gain=rng.uniform(0.4, 0.8, num_channels),
        live=np.ones(num_channels, dtype=bool),
        order=np.arange(num_channels),
    )

    sessions = []
    for index, length in enumerate(lengths):
        if index > 0:
            channel_map = _drifted(channel_map, drift, rest[2 * index])
        stream = np.random.default_rng(rest[2 * index + 1])
        latent = _latent_path(stream, dynamics, length)
        sessions.append(
            Session(
                spikes=_spike_counts(stream, latent, tuning, channel_map, bin_size),
                velocity=latent @ readout.T,
                channels=tuple(f"ch {c:03d}" for c in range(num_channels)),
                date=FIRST_DATE + dt.timedelta(days=days_between * index),
                bin_size=bin_size,
                source=f"synthetic:{seed}",
                kind="synthetic",
            )
        )
    return sessions


def _rotations(rng: np.random.Generator, size: int, bin_size: float) -> np.ndarray:
    """A of Eq. (1): damped 2-D rotations at 0.3-1.5 Hz on the diagonal."""
    dynamics = np.zeros((size, size))
    for block, freq in enumerate(rng.uniform(0.3, 1.5, size // 2)):
        angle = 2 * np.pi * freq * bin_size
        cos, sin = np.cos(angle), np.sin(angle)
        i = 2 * block
        dynamics[i : i + 2, i : i + 2] = RADIUS * np.array([[cos, -sin], [sin, cos]])
    return dynamics


def _velocity_map(rng: np.random.Generator, out: int, size: int) -> np.ndarray:
    """V of Eq. (2), rows scaled to unit output variance (z has unit variance)."""
    readout = rng.standard_normal((out, size))
    return readout / np.linalg.norm(readout, axis=1, keepdims=True)


def _latent_path(
    rng: np.random.Generator, dynamics: np.ndarray, length: int
) -> np.ndarray:
    """Eq. (1) from its stationary distribution, (length, L)."""
    size = dynamics.shape[0]
    noise = rng.standard_normal((length, size)) * np.sqrt(1 - RADIUS**2)
    latent = np.empty((length, size))
    state = rng.standard_normal(size)
    for t in range(length):
        state = dynamics @ state + noise[t]
        latent[t] = state
    return latent


def _spike_counts(
    rng: np.random.Generator,
    latent: np.ndarray,
    tuning: np.ndarray,
    channel_map: _ChannelMap,
    bin_size: float,
) -> np.ndarray:
    """Eqs. (3)-(4), with dead channels silent and columns in `order`."""
    log_rate = channel_map.baseline + channel_map.gain * (latent @ tuning.T)
    rate = np.exp(np.minimum(log_rate, MAX_LOG_RATE)) * channel_map.live
    counts = rng.poisson(rate * bin_size)
    return counts[:, channel_map.order].astype(np.float32)


def _drifted(
    channel_map: _ChannelMap, drift: Drift, seed: np.random.SeedSequence
) -> _ChannelMap:
    """The next session's channel map (module docstring, "Session drift")."""
    rng = np.random.default_rng(seed)
    size = channel_map.gain.size
    gain = channel_map.gain * np.exp(drift.gain_sd * rng.standard_normal(size))
    baseline = channel_map.baseline + drift.baseline_sd * rng.standard_normal(size)

    live = channel_map.live.copy()
    alive = np.flatnonzero(live)
    live[rng.permutation(alive)[: int(round(drift.drop_fraction * alive.size))]] = 0

    order = channel_map.order.copy()
    pairs = rng.permutation(size)[: 2 * int(drift.swap_fraction * size / 2)]
    first, second = pairs[0::2], pairs[1::2]
    order[first], order[second] = order[second], order[first].copy()
    return _ChannelMap(baseline=baseline, gain=gain, live=live, order=order)


def _session_lengths(num_sessions: int, num_bins: int | list[int]) -> list[int]:
    if num_sessions < 1:
        raise ValueError(
            f"make_sessions: `num_sessions` must be >= 1, got {num_sessions}."
        )
    lengths = [num_bins] * num_sessions if isinstance(num_bins, int) else list(num_bins)
    if len(lengths) != num_sessions or min(lengths) < 1:
        raise ValueError(
            f"make_sessions: `num_bins` must be a positive int or {num_sessions} "
            f"positive ints, got {num_bins}."
        )
    return lengths


def _check_sizes(channels: int, latent: int, velocity: int, bin_size: float) -> None:
    if channels < 2:
        raise ValueError(f"make_sessions: `num_channels` must be >= 2, got {channels}.")
    if latent < 2 or latent % 2:
        raise ValueError(
            f"make_sessions: `latent_size` must be even and >= 2, got {latent}."
        )
    if velocity < 1:
        raise ValueError(
            f"make_sessions: `velocity_size` must be >= 1, got {velocity}."
        )
    if not bin_size > 0:
        raise ValueError(f"make_sessions: `bin_size` must be > 0 s, got {bin_size}.")
