r"""Spectral and numerical diagnostics: why a few paths are enough.

Three instruments (DESIGN.md section 6):

- **Matrix spectra** (`spectrum` and the functions beside it): the singular
  values sigma_1 >= ... >= sigma_r of a matrix (r = min(m, n)) and

  .. math::
      \kappa = \sigma_1 / \sigma_r, \qquad
      r_{\mathrm{eff}} = \frac{(\sum_i \sigma_i^2)^2}{\sum_i \sigma_i^4}, \qquad
      \mathrm{isotropy} = r_{\mathrm{eff}} / r.

  The effective rank is the participation ratio of the squared singular
  values: r for a multiple of an orthogonal matrix, 1 for a rank-one matrix.
  A matrix whose numerical rank is below r (numpy's `matrix_rank` rule:
  singular values at or below sigma_1 * max(m, n) * eps of its dtype count as
  zero) is reported as rank-deficient and its condition number is `inf`
  (numpy's `cond` would return a huge finite ratio of rounding errors).
  `trajectory_spectra` gives them for J_t along a cell's own trajectory.
- **`TrajectoryRecorder`**: wraps one learner's `step` and records, at every
  step, the spectrum of the recurrent Jacobian J_t, the Frobenius norm and
  (optionally) the singular values of the influence M_t, and the drift of
  the learner's influence against a float64 shadow run on the same inputs
  and parameters. It only reads the learner: outputs, gradients, influence
  and mask generator are bitwise what they would be without it.
- **`GradientComparison`**: runs approximate estimators side by side with an
  exact RTRL reference on one cell (shared parameters, the same inputs, the
  same loss) and records, per step, the cosine and the relative error
  ||g_hat - g|| / ||g|| of each one's gradient c_t M_t against the exact one,
  per step and accumulated since the start.

All results come back as tensors and floats; nothing is printed.
"""

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .cells import CellAdapter, adapt
from .estimators import RTRL, OnlineEstimator, SparseRTRL


# Matrix spectra -------------------------------------------------------------


@dataclass(frozen=True)
class Spectrum:
    """The spectrum of a matrix, or of each matrix of a batch (..., m, n).

    Fields (leading shape ... of the input):
        singular_values: (..., r), descending, r = min(m, n).
        condition_number: (...), sigma_max / sigma_min; inf if rank-deficient.
        effective_rank: (...), (sum sigma^2)^2 / sum sigma^4 (0 for a zero matrix).
        isotropy: (...), effective_rank / r, in [0, 1].
        rank: (...), int64, the numerical rank (numpy's `matrix_rank` rule).
        rank_deficient: (...), bool, rank < r.
    """

    singular_values: torch.Tensor
    condition_number: torch.Tensor
    effective_rank: torch.Tensor
    isotropy: torch.Tensor
    rank: torch.Tensor
    rank_deficient: torch.Tensor


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of (..., m, n), descending: (..., min(m, n))."""
    _check_matrix("singular_values", matrix)
    return torch.linalg.svdvals(matrix)


def rank_tolerance(values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """numpy's `matrix_rank` threshold: sigma_max * max(m, n) * eps, (...)."""
    return values[..., 0] * max(shape) * torch.finfo(values.dtype).eps


def spectrum(matrix: torch.Tensor) -> Spectrum:
    """Singular values, condition number, effective rank and isotropy of (..., m, n)."""
    values = singular_values(matrix)
    size = values.shape[-1]

    rank = (values > rank_tolerance(values, matrix.shape[-2:])[..., None]).sum(-1)
    deficient = rank < size
    ratio = values[..., 0] / values[..., -1]
    condition = torch.where(deficient, torch.full_like(ratio, math.inf), ratio)

    effective = effective_rank_of(values)
    return Spectrum(values, condition, effective, effective / size, rank, deficient)


def effective_rank_of(values: torch.Tensor) -> torch.Tensor:
    r"""(sum sigma^2)^2 / sum sigma^4 over the last axis; 0 where all are 0."""
    power = values * values
    total = power.sum(-1)
    quartic = (power * power).sum(-1)
    safe = torch.where(quartic > 0, quartic, torch.ones_like(quartic))
    return torch.where(quartic > 0, total * total / safe, torch.zeros_like(total))


def condition_number(matrix: torch.Tensor) -> torch.Tensor:
    """sigma_max / sigma_min of (..., m, n); inf where the matrix is rank-deficient."""
    return spectrum(matrix).condition_number


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """The participation ratio (sum sigma^2)^2 / sum sigma^4 of (..., m, n)."""
    return spectrum(matrix).effective_rank


def isotropy(matrix: torch.Tensor) -> torch.Tensor:
    """Effective rank / min(m, n): 1 for a multiple of an orthogonal matrix."""
    return spectrum(matrix).isotropy


def _check_matrix(who: str, matrix: torch.Tensor) -> None:
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{who}: `matrix` must be a torch.Tensor, got {type(matrix)}.")
    if matrix.dim() < 2 or min(matrix.shape[-2:]) == 0:
        raise ValueError(
            f"{who}: `matrix` must have shape (..., m, n) with m, n >= 1, got "
            f"{tuple(matrix.shape)}."
        )
    if not matrix.is_floating_point():
        raise TypeError(
            f"{who}: `matrix` must be floating point, got {matrix.dtype}; convert "
            "with matrix.double()."
        )


# Vector comparisons -----------------------------------------------------------


def cosine(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Cosine of the angle between two flat tensors; nan if either is zero."""
    a, b = estimate.reshape(-1).double(), exact.reshape(-1).double()
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else math.nan


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """||estimate - exact||_2 / ||exact||_2 over all entries; nan if exact is 0."""
    a, b = estimate.reshape(-1).double(), exact.reshape(-1).double()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm > 0 else math.nan


def relative_frobenius(estimate: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per stream ||estimate_b - exact_b||_F / ||exact_b||_F of (B, ...), in float64.

    A stream whose reference is zero gives 0 if the estimate is zero too, else inf.
    """
    a = estimate.to(torch.float64).flatten(1)
    b = exact.to(torch.float64).flatten(1)
    diff, norm = (a - b).norm(dim=1), b.norm(dim=1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    zero_ref = torch.where(diff > 0, math.inf, 0.0).to(diff)
    return torch.where(norm > 0, diff / safe, zero_ref)


# Recording along a trajectory -------------------------------------------------


@torch.no_grad()
def trajectory_spectra(
    cell: nn.Module,
    inputs: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    state_size: int | None = None,
) -> Spectrum:
    """Spectra of J_t along the cell's own trajectory on `inputs` (no learning).

    Args:
        cell: any cell `adapt` supports.
        inputs: (T, B, I) in the cell's dtype.
        state: (B, S) initial state; None for zeros.
        state_size: for a generic cell that does not declare it.

    Returns:
        A `Spectrum` whose fields have a leading (T, B): J_t at step t is
        d s_t / d s_{t-1}, taken at the state before step t.
    """
    adapter = adapt(cell, state_size=state_size)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        raise ValueError(
            "trajectory_spectra: `inputs` must be a (T, B, I) tensor, got "
            f"{getattr(inputs, 'shape', type(inputs))}."
        )
    if state is None:
        state = adapter.initial_state(inputs.shape[1])
    jacobians = []
    for x in inputs:
        step = adapter.step(x, state, jacobian=True)
        jacobians.append(step.recurrent_jacobian)
        state = step.state
    return spectrum(torch.stack(jacobians))


class TrajectoryRecorder:
    r"""Records J_t spectra, the influence and its float64 drift along a trajectory.

    Use it in place of `learner.step`; everything else of the online loop is
    unchanged::

        recorder = TrajectoryRecorder(learner, drift=True)
        for x, y in stream:
            h = recorder.step(x)           # = learner.step(x), plus the records
            learner.backward(loss_fn(readout(h), y))
            opt.step(); opt.zero_grad()
        history = recorder.history()       # tensors with a leading time axis

    At each step it records:

    - J_t = d s_t / d s_{t-1} at the learner's state before the step, from an
      adapter of its own (`spectrum`): singular values, condition number,
      effective rank, isotropy, rank.
    - ||M_t||_F per stream, and every `influence_every` steps the singular
      values of M_t (S x P per stream), for learners that carry a dense
      influence (`RTRL`, `SparseRTRL`).
    - with `drift=True` (`RTRL` and `SparseRTRL` only): the relative Frobenius
      difference ||M_t - M_t^{64}||_F / ||M_t^{64}||_F per stream, where
      M^{64} is a shadow run in `shadow_dtype` (default float64) of the same
      recurrence on the same inputs with the learner's parameters cast up at
      every step (so it follows an optimizer) and, for `SparseRTRL`, the
      learner's own path masks (the shadow draws none). The shadow starts
      from the learner's state and influence when recording starts, and from
      zero when the learner is reset. A float64 learner has drift exactly 0.

    The recorder only reads the learner (its state, influence, mask and
    parameters) and never draws from its generator: the learner's outputs,
    gradients and memory are bitwise the same with and without it.

    Args:
        learner: the estimator to watch.
        jacobian: record J_t spectra (costs one extra cell step and an S x S
            SVD per stream per step).
        influence: record ||M_t||_F (None: when the learner has a dense one).
        influence_every: also record the singular values of M_t every this
            many steps (0: never; an (S x P) SVD per stream is not cheap).
        drift: run the float64 shadow and record the drift.
        shadow_dtype: dtype of the shadow run.

    Limitations: the influence and the drift need a dense (B, S, P) influence
    (`RTRL`, `SparseRTRL`); other estimators get the J_t spectra only.
    """

    def __init__(
        self,
        learner: OnlineEstimator,
        *,
        jacobian: bool = True,
        influence: bool | None = None,
        influence_every: int = 0,
        drift: bool = False,
        shadow_dtype: torch.dtype = torch.float64,
    ) -> None:
        if not isinstance(learner, OnlineEstimator):
            raise TypeError(
                "TrajectoryRecorder: `learner` must be an OnlineEstimator such as "
                f"RTRL(cell), got {type(learner).__name__}."
            )
        dense = isinstance(learner, (RTRL, SparseRTRL))
        if influence is None:
            influence = dense
        for name, wanted in (("influence", influence), ("drift", drift)):
            if wanted and not dense:
                raise NotImplementedError(
                    f"TrajectoryRecorder: `{name}=True` needs a dense influence "
                    f"(RTRL or SparseRTRL); {type(learner).__name__} has none. Use "
                    f"`{name}=False` to record the Jacobian spectra only."
                )
        if isinstance(influence_every, bool) or influence_every < 0:
            raise ValueError(
                "TrajectoryRecorder: `influence_every` must be an int >= 0 (0: "
                f"never), got {influence_every!r}."
            )
        self.learner = learner
        self.jacobian = jacobian
        self.influence = influence
        self.influence_every = influence_every if influence else 0
        self.adapter: CellAdapter = adapt(
            learner.cell, state_size=learner.adapter.state_size
        )
        self.shadow = _Shadow(learner, shadow_dtype) if drift else None
        self.records: dict[str, list] = {}
        self.steps_recorded = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`learner.step(x)`, recording J_t before it and M_t after it."""
        learner = self.learner
        fresh = learner.memory.state is None
        if self.shadow is not None and (fresh or not self.shadow.started):
            self.shadow.start(learner, x.shape[0])
        if self.jacobian and isinstance(x, torch.Tensor):
            self._record_jacobian(x, learner.memory.state)

        hidden = learner.step(x)

        if self.influence:
            self._record_influence(learner.memory.influence)
        if self.shadow is not None:
            shadow = self.shadow.step(learner, x)
            drift = relative_frobenius(learner.memory.influence, shadow)
            self._append("drift", drift)
        self.steps_recorded += 1
        return hidden

    def history(self) -> dict[str, torch.Tensor]:
        """Every record stacked over time: name -> (T_recorded, B, ...) tensor.

        Keys: `jacobian_singular_values` (T, B, S), `jacobian_condition`,
        `jacobian_effective_rank`, `jacobian_isotropy`, `jacobian_rank` (T, B);
        `influence_norm` (T, B); `influence_singular_values` (T', B, S) with
        `influence_steps` (T',) the 0-based steps they were taken at;
        `drift` (T, B). Only what was recorded is present.
        """
        out = {}
        for name, values in self.records.items():
            if name == "influence_steps":
                out[name] = torch.tensor(values, dtype=torch.int64)
            else:
                out[name] = torch.stack(values)
        return out

    def _record_jacobian(self, x: torch.Tensor, state: torch.Tensor | None) -> None:
        if state is None:
            state = self.adapter.initial_state(x.shape[0])
        with torch.no_grad():
            jacobian = self.adapter.step(x, state, jacobian=True).recurrent_jacobian
            found = spectrum(jacobian)
        self._append("jacobian_singular_values", found.singular_values)
        self._append("jacobian_condition", found.condition_number)
        self._append("jacobian_effective_rank", found.effective_rank)
        self._append("jacobian_isotropy", found.isotropy)
        self._append("jacobian_rank", found.rank)

    def _record_influence(self, influence: torch.Tensor) -> None:
        with torch.no_grad():
            self._append("influence_norm", influence.flatten(1).norm(dim=1))
            every = self.influence_every
            if every and self.steps_recorded % every == 0:
                self._append("influence_singular_values", singular_values(influence))
                self._append("influence_steps", self.steps_recorded)

    def _append(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        self.records.setdefault(name, []).append(value)


class _Shadow:
    """The learner's influence recurrence rerun in another dtype (see the recorder).

    Mirrors `RTRL._advance` and `SparseRTRL._advance` operation for operation,
    so in the learner's own dtype it reproduces the learner's influence bitwise.
    """

    def __init__(self, learner: OnlineEstimator, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.cell = copy.deepcopy(learner.cell).to(dtype)
        self.adapter = adapt(self.cell, state_size=learner.adapter.state_size)
        self.sparse = isinstance(learner, SparseRTRL)
        self.scale = _sparse_scale(learner, dtype) if self.sparse else None
        self.started = False
        self.state = self.influence = self.spare = None
        self.step_count = 0

    def start(self, learner: OnlineEstimator, batch: int) -> None:
        """Begin at the learner's current state and influence (zeros if none)."""
        memory = learner.memory
        shape = (batch, self.adapter.state_size, self.adapter.num_params)
        kind = {"dtype": self.dtype, "device": self.adapter.device}
        if memory.state is None:
            self.state = torch.zeros(batch, self.adapter.state_size, **kind)
            # RTRL's storage order; a sparse one is set per step, as the learner's.
            column = not self.sparse and kernels.exact_column_major(
                shape[1], self.adapter.device
            )
            self.influence = kernels.new_influence(*shape, column_major=column, **kind)
            self.step_count = 0
        else:
            self.state = memory.state.to(**kind, copy=True)
            self.influence = memory.influence.to(**kind, copy=True)  # same order
            self.step_count = memory.step_count
        self.spare = torch.zeros_like(self.influence)
        self.started = True

    @torch.no_grad()
    def step(self, learner: OnlineEstimator, x: torch.Tensor) -> torch.Tensor:
        """One step of Eq. (1) of RTRL / SparseRTRL in the shadow dtype."""
        for mine, theirs in zip(
            self.adapter.params, learner.adapter.params, strict=True
        ):
            mine.copy_(theirs)
        first = self.step_count == 0
        step = self.adapter.step(x.to(self.dtype), self.state, jacobian=True)
        jacobian = step.recurrent_jacobian

        if self.sparse:
            index = learner.memory.path_index
            weight = jacobian.gather(2, index) * self.scale
            column = kernels.prefers_column_major(self.influence, index.shape[2])
            if kernels.column_major(self.influence) != column:
                self.influence = kernels.with_layout(self.influence, column)
                self.spare = torch.empty_like(self.influence)
            kernels.propagate_sparse(self.influence, index, weight, self.spare)
        elif first:
            self.spare.zero_()
        else:
            kernels.propagate_exact(jacobian, self.influence, self.spare)
        kernels.add_immediate(self.adapter, self.spare, step.immediate)

        self.influence, self.spare = self.spare, self.influence
        self.state = step.state
        self.step_count += 1
        return self.influence


def _sparse_scale(learner: SparseRTRL, dtype: torch.dtype) -> torch.Tensor:
    """SparseRTRL's per-column path scale (its Eq. (3)), built in `dtype`."""
    drawn, size = learner.num_drawn, learner.adapter.state_size
    candidates = size - 1 if learner.keep_self else size
    factor = candidates / drawn if learner.rescale and drawn > 0 else 1.0
    scale = [1.0] * int(learner.keep_self) + [factor] * drawn
    return torch.tensor(scale, dtype=dtype, device=learner.adapter.device)


# Gradient alignment -----------------------------------------------------------


LossFn = Callable[[torch.Tensor], torch.Tensor]


class GradientComparison:
    r"""Approximate gradients against exact RTRL on one trajectory.

    Every estimator (the exact `RTRL` reference, built here, and each entry of
    `approximations`) wraps the same cell, so all share its parameters; each
    `step(x, loss_fn)` advances all of them on the same x, computes each one's
    credit c_t = dL_t/dh_t from its own h_t through `loss_fn`, and reads its
    gradient g_t = c_t M_t (the cell part of `learner.backward`) without
    touching any `.grad` the caller holds. It takes no optimizer step: the
    parameters are whatever the caller leaves in the cell, identical for all,
    so the states s_t agree and the gradients differ only by how each one
    approximates the influence. (A caller that steps an optimizer on the
    cell between calls applies the same update to every estimator.)

    Per step and per approximation it records, against the exact g_t,
    `cosine` and `rel_error` = ||g_hat - g|| / ||g||, and the same for the
    gradients accumulated since the first step (`cum_cosine`,
    `cum_rel_error`), which for a fixed cell is the BPTT gradient of the
    summed loss. Values are nan where the exact gradient is zero.

    Args:
        cell: the recurrent cell all estimators wrap.
        approximations: name -> estimator built on `cell`.
        reference: the exact estimator (default `RTRL(cell)`).
    """

    def __init__(
        self,
        cell: nn.Module,
        approximations: Mapping[str, OnlineEstimator],
        *,
        reference: OnlineEstimator | None = None,
    ) -> None:
        self.cell = cell
        self.reference = RTRL(cell) if reference is None else reference
        self.approximations = dict(approximations)
        for name, learner in {
            "reference": self.reference,
            **self.approximations,
        }.items():
            if not isinstance(learner, OnlineEstimator) or learner.cell is not cell:
                raise ValueError(
                    f"GradientComparison: estimator {name!r} must be an "
                    "OnlineEstimator built on the same `cell` object (shared "
                    f"parameters), got {type(learner).__name__}."
                )
        self.params = list(cell.parameters())
        self.records: dict[str, dict[str, list[float]]] = {
            name: {
                k: [] for k in ("cosine", "rel_error", "cum_cosine", "cum_rel_error")
            }
            for name in self.approximations
        }
        self.totals: dict[str, torch.Tensor] = {}

    def step(self, x: torch.Tensor, loss_fn: LossFn) -> dict[str, dict[str, float]]:
        """Advance every estimator on x; return name -> this step's metrics."""
        exact = self._gradient("reference", self.reference, x, loss_fn)
        out = {}
        for name, learner in self.approximations.items():
            grad = self._gradient(name, learner, x, loss_fn)
            row = {
                "cosine": cosine(grad, exact),
                "rel_error": relative_error(grad, exact),
                "cum_cosine": cosine(self.totals[name], self.totals["reference"]),
                "cum_rel_error": relative_error(
                    self.totals[name], self.totals["reference"]
                ),
            }
            for key, value in row.items():
                self.records[name][key].append(value)
            out[name] = row
        return out

    def history(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> metric -> (T,) float64 tensor over the steps taken."""
        return {
            name: {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
            for name, rows in self.records.items()
        }

    def _gradient(
        self, name: str, learner: OnlineEstimator, x: torch.Tensor, loss_fn: LossFn
    ) -> torch.Tensor:
        hidden = learner.step(x)
        (credit,) = torch.autograd.grad(loss_fn(hidden), hidden, allow_unused=True)
        saved = [p.grad for p in self.params]
        for param in self.params:
            param.grad = None
        hidden.grad = credit
        learner.backward(None)
        grad = torch.cat([_flat_grad(p) for p in self.params])
        for param, old in zip(self.params, saved, strict=True):
            param.grad = old
        total = self.totals.get(name)
        self.totals[name] = grad.clone() if total is None else total + grad
        return grad


def _flat_grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
    return param.grad.reshape(-1)
