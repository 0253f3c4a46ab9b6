r"""Task streams for the online-adaptation benchmark, each with a task A and a shift B.

Every task is generated here from a `numpy.random.Generator` (no downloads),
so a stream is a deterministic function of its seed. A task has two variants:
"A" (the network is pretrained on it) and "B" (the shifted task it adapts to
online). `Task.sample(variant, length, rng, batch)` returns a `Stream` of
arrays (batch, T, ·) in float64; the runner casts them to the run's dtype.

- `SineTask`: next-step prediction of a sum of sinusoids; B changes the
  frequencies.
- `DelayedRecallTask`: predict a weighted sum of past inputs
  y_t = \sum_j w_j u_{t - d_j}; B changes the delays and weights.
- `LorenzTask`: next-step prediction of the Lorenz system (RK4, in-library);
  B changes rho (both in the chaotic regime).
- `AddingTask`: a weighted sum of two marked values of a segment, given at
  the segment's end (the end-of-segment error regime of C10); B changes the
  weights.

`Stream.segment_end` marks the steps where an end-of-segment error exists
(every step for the next-step tasks); `Stream.targets` holds a target for
every step (for the adding task: the running weighted sum of the marked values
seen so far in the segment, so the continuous regime has an error everywhere).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


VARIANTS = ("A", "B")


@dataclass(frozen=True)
class Stream:
    """A batch of task streams.

    Fields:
        inputs: (B, T, I) float64.
        targets: (B, T, O) float64, a target at every step.
        segment_end: (T,) bool, where an end-of-segment error exists (and where
            the loss is evaluated when `evaluate_at_segment_end`).
        evaluate_at_segment_end: the task's loss counts segment ends only.
    """

    inputs: np.ndarray
    targets: np.ndarray
    segment_end: np.ndarray
    evaluate_at_segment_end: bool = False


class Task(ABC):
    """A task with variants "A" and "B" (the shift)."""

    name: str
    input_size: int
    output_size: int

    def sample(
        self, variant: str, length: int, rng: np.random.Generator, batch: int = 1
    ) -> Stream:
        """`batch` independent streams of `length` steps of task `variant`."""
        if variant not in VARIANTS:
            raise ValueError(
                f"{type(self).__name__}.sample: `variant` must be 'A' or 'B', "
                f"got {variant!r}."
            )
        if int(length) < 1 or int(batch) < 1:
            raise ValueError(
                f"{type(self).__name__}.sample: `length` and `batch` must be "
                f"positive, got length={length}, batch={batch}."
            )
        return self._sample(variant, int(length), rng, int(batch))

    @abstractmethod
    def _sample(
        self, variant: str, length: int, rng: np.random.Generator, batch: int
    ) -> Stream: ...


def _next_step(series: np.ndarray) -> Stream:
    """Inputs x_t and targets x_{t+1} from a (B, T + 1, D) series."""
    length = series.shape[1] - 1
    return Stream(
        inputs=series[:, :-1].copy(),
        targets=series[:, 1:].copy(),
        segment_end=np.ones(length, dtype=bool),
    )


class SineTask(Task):
    r"""Next-step prediction of x_t = (1/m) \sum_j \sin(2\pi f_j t + \phi_j).

    Phases phi_j are uniform per stream. Task A uses `frequencies_a`, task B
    `frequencies_b` (cycles per step). Input and output size 1.
    """

    name = "sine"
    input_size = 1
    output_size = 1

    def __init__(
        self,
        frequencies_a: tuple[float, ...] = (0.021, 0.047, 0.083),
        frequencies_b: tuple[float, ...] = (0.031, 0.067, 0.113),
    ) -> None:
        self.frequencies = {"A": tuple(frequencies_a), "B": tuple(frequencies_b)}

    def _sample(self, variant, length, rng, batch):
        freqs = np.asarray(self.frequencies[variant])
        phases = rng.uniform(0, 2 * np.pi, size=(batch, 1, len(freqs)))
        time = np.arange(length + 1)[None, :, None]
        waves = np.sin(2 * np.pi * freqs * time + phases).mean(axis=2)
        return _next_step(waves[..., None])


class DelayedRecallTask(Task):
    r"""y_t = \sum_j w_j u_{t - d_j} for i.i.d. inputs u_t ~ N(0, 1).

    Task A uses (`delays_a`, `weights_a`), task B (`delays_b`, `weights_b`);
    inputs before the stream's start count as 0. Input and output size 1.
    """

    name = "delayed_recall"
    input_size = 1
    output_size = 1

    def __init__(
        self,
        delays_a: tuple[int, ...] = (2, 5),
        weights_a: tuple[float, ...] = (1.0, 0.5),
        delays_b: tuple[int, ...] = (3, 7),
        weights_b: tuple[float, ...] = (0.5, -1.0),
    ) -> None:
        for delays, weights in ((delays_a, weights_a), (delays_b, weights_b)):
            if len(delays) != len(weights) or min(delays) < 0:
                raise ValueError(
                    "DelayedRecallTask: delays and weights must have equal length "
                    f"and delays must be >= 0, got {delays} and {weights}."
                )
        self.delays = {"A": tuple(delays_a), "B": tuple(delays_b)}
        self.weights = {"A": tuple(weights_a), "B": tuple(weights_b)}

    def _sample(self, variant, length, rng, batch):
        inputs = rng.standard_normal((batch, length, 1))
        targets = np.zeros_like(inputs)
        for delay, weight in zip(
            self.delays[variant], self.weights[variant], strict=True
        ):
            if delay >= length:
                continue
            targets[:, delay:] += weight * inputs[:, : length - delay]
        return Stream(inputs, targets, np.ones(length, dtype=bool))


def lorenz_rk4(
    start: np.ndarray,
    steps: int,
    dt: float,
    rho: float,
    sigma: float = 10.0,
    beta: float = 8.0 / 3.0,
) -> np.ndarray:
    r"""Integrate the Lorenz system with classical RK4 (fixed step `dt`).

    .. math::
        \dot x = \sigma (y - x),\quad \dot y = x(\rho - z) - y,\quad
        \dot z = xy - \beta z

    Args:
        start: (B, 3) initial points.
        steps: number of RK4 steps.

    Returns:
        (B, steps + 1, 3), the start included.
    """

    def field(p):
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        return np.stack((sigma * (y - x), x * (rho - z) - y, x * y - beta * z), 1)

    out = np.empty((start.shape[0], steps + 1, 3))
    out[:, 0] = point = start
    for t in range(steps):
        k1 = field(point)
        k2 = field(point + 0.5 * dt * k1)
        k3 = field(point + 0.5 * dt * k2)
        k4 = field(point + dt * k3)
        point = point + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[:, t + 1] = point
    return out


class LorenzTask(Task):
    r"""Next-step prediction of the Lorenz system, sampled every `stride` RK4 steps.

    Each stream starts from a random point, integrated for `washout` RK4 steps
    onto the attractor first. Coordinates are scaled to about unit range:
    (x / 10, y / 10, (z - 25) / 10). Task A uses `rho_a` = 28, task B `rho_b`
    = 45 (both chaotic). Input and output size 3. With `stride` 5 (0.05 time
    units per step) the next step depends on the dynamics enough that the rho
    shift leaves a real gap between the frozen net and exact RTRL (with stride
    2 the frozen net's loss on B was already below exact RTRL's, so recovery
    was n/a on every seed).
    """

    name = "lorenz"
    input_size = 3
    output_size = 3

    def __init__(
        self,
        rho_a: float = 28.0,
        rho_b: float = 45.0,
        dt: float = 0.01,
        stride: int = 5,
        washout: int = 500,
    ) -> None:
        self.rho = {"A": float(rho_a), "B": float(rho_b)}
        self.dt, self.stride, self.washout = float(dt), int(stride), int(washout)

    def _sample(self, variant, length, rng, batch):
        rho = self.rho[variant]
        start = rng.uniform(-10, 10, size=(batch, 3)) + np.array([0, 0, 25.0])
        warm = lorenz_rk4(start, self.washout, self.dt, rho)[:, -1]
        path = lorenz_rk4(warm, length * self.stride, self.dt, rho)[:, :: self.stride]
        scaled = (path - np.array([0.0, 0.0, 25.0])) / 10.0
        return _next_step(scaled)


class AddingTask(Task):
    r"""A weighted sum of the two marked values of each segment.

    Inputs per step: a value v_t ~ U(-1, 1), a marker (1 at the two marked
    steps of the segment, drawn uniformly without replacement), and a
    segment-start flag. The target at the last step of a segment of
    `segment_length` steps is w_1 v_{m_1} + w_2 v_{m_2} (m_1 < m_2); at other
    steps it is the running sum of the marked values seen so far (the
    continuous-error variant). The loss is evaluated at segment ends.
    Task A uses `weights_a`, task B `weights_b`. Input size 3, output size 1.
    """

    name = "adding"
    input_size = 3
    output_size = 1

    def __init__(
        self,
        segment_length: int = 10,
        weights_a: tuple[float, float] = (1.0, 1.0),
        weights_b: tuple[float, float] = (1.0, -1.0),
    ) -> None:
        if int(segment_length) < 2:
            raise ValueError(
                f"AddingTask: `segment_length` must be >= 2, got {segment_length}."
            )
        self.segment_length = int(segment_length)
        self.weights = {"A": tuple(weights_a), "B": tuple(weights_b)}

    def _sample(self, variant, length, rng, batch):
        seg = self.segment_length
        count = -(-length // seg)
        values = rng.uniform(-1, 1, size=(batch, count, seg))
        order = rng.random((batch, count, seg)).argsort(axis=2)[:, :, :2]
        marks = np.zeros((batch, count, seg))
        np.put_along_axis(marks, order, 1.0, axis=2)

        rank = np.cumsum(marks, axis=2) * marks  # 1 at the first mark, 2 at the second
        w1, w2 = self.weights[variant]
        contrib = values * (w1 * (rank == 1) + w2 * (rank == 2))
        running = np.cumsum(contrib, axis=2)

        start = np.zeros((batch, count, seg))
        start[:, :, 0] = 1.0
        inputs = np.stack((values, marks, start), axis=3).reshape(batch, -1, 3)
        ends = np.zeros(count * seg, dtype=bool)
        ends[seg - 1 :: seg] = True
        return Stream(
            inputs=inputs[:, :length],
            targets=running.reshape(batch, -1, 1)[:, :length],
            segment_end=ends[:length],
            evaluate_at_segment_end=True,
        )


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SineTask, DelayedRecallTask, LorenzTask, AddingTask)
}


def make_task(name: str, **options) -> Task:
    """The task registered under `name`, built with its keyword options."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(
            f"make_task: unknown task {name!r}; expected one of "
            f"{', '.join(sorted(TASKS))}."
        ) from None
    return cls(**options)
