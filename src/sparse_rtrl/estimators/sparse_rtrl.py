r"""Sparse real-time recurrent learning: K propagation paths per state unit."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, final

import torch
from torch import nn

from .. import kernels
from .base import EstimatorState, OnlineEstimator, make_generator


SELECTIONS = ("random", "topk", "adversarial")
FLOYD_MIN_CANDIDATES = 256  # below, scoring all S candidates costs fewer ops


@dataclasses.dataclass
class SparseRTRLState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    influence: (B, S, P), the sparse estimate of M_t (a property: reading it
        runs the step's update if `backward` has not run it yet).
    path_index: (B, S, K_kept), the kept incoming paths of each unit (with
        `keep_self`, column 0 is the unit itself); None before the first draw.
    _current: the influence as of the last update that ran; column-major
        while the "dense" backend runs, else row-major (see `kernels`).
    _spare: (B, S, P), the buffer M_{t+1} is written into (then swapped) by a
        kernel path that cannot update in place; None until one needs it.
    _pending: the step's deferred update, or None once it has run.
    _fused: whether the last update ran as one pass (`kernels.fuses_update`).
    """

    path_index: torch.Tensor | None = None
    _current: torch.Tensor | None = None
    _spare: torch.Tensor | None = None
    _pending: Callable[..., Any] | None = None
    _fused: bool | None = None

    @property
    def influence(self) -> torch.Tensor | None:
        if self._pending is not None:
            self._pending()
        return self._current

    @influence.setter
    def influence(self, value: torch.Tensor | None) -> None:
        self._pending, self._current = None, value


@final
class SparseRTRL(OnlineEstimator):
    r"""RTRL that propagates the influence through K of the S paths into each unit.

    Exact RTRL mixes every row of the influence into every other through the
    recurrent Jacobian. Sparse RTRL keeps, for each unit i, only K entries of
    row i of J_t (its K incoming paths, the self-path among the candidates) and
    drops the rest; the immediate Jacobian is kept whole:

    .. math::
        M_t = (A_t \odot J_t)\, M_{t-1} + \bar I_t                   \qquad (1)

        g_t = c_t M_t                                                \qquad (2)

    A_t is a 0/1 path mask with K ones per row, stored as `path_index`
    (B, S, K), chosen per stream by `selection`: "random" (uniform without
    replacement), "topk" (largest |J_ij| of the row) or "adversarial"
    (smallest). With `keep_self` the self-path (i, i) is always kept, in
    addition to K paths drawn among the other S - 1 (min(K, S - 1) of them).
    With `rescale` (random selection only) kept entries are multiplied by S/K
    ((S - 1)/K for the non-self entries with `keep_self`):

    .. math::
        \mathbb{E}[c A_t \odot J_t] = J_t                            \qquad (3)

    and, with a fresh mask every step (`resample=1`), the influence is an
    unbiased estimate of the exact one, because M_t is multilinear in the
    independent masks. K = S (every path) gives exact RTRL; K = 0 keeps only
    the immediate Jacobian (one-step truncation), and K = 0 with `keep_self`
    keeps each unit's own past (SnAp-1 for a vanilla RNN).

    Properties: biased unless `rescale` with random selection and
    `resample=1`. Memory O(B S P); compute O(B S K P) for (1) plus O(B S^2)
    for the Jacobian and the selection. Supports every cell.

    The update (1) of step t waits for `backward`, which runs it together with
    (2) in one pass over M_t where the kernel backend can
    (`kernels.sparse_step`); otherwise the next `step`, `state_dict` or any
    read of `memory.influence` runs it. The results are the same, to the bit.

    Args:
        cell: the recurrent cell.
        num_paths: K in [0, S].
        selection: "random", "topk" or "adversarial".
        keep_self: always keep the self-path, in addition to K others.
        resample: redraw the mask when the step count since `reset()` is a
            multiple of this; None draws it once, at the first step.
        rescale: scale kept entries of a random mask as in (3).
        generator: the source of random masks (a torch.Generator, a seed, or
            None for a seed drawn from torch's global generator).

    Limitations: like exact RTRL it stores the dense (B, S, P) influence, so
    its floor is one read and one write of it per step, and the update, with
    the gradient formed in the same pass, takes a small multiple of that (see
    `sparse-rtrl bench` and the README's performance table).

    References:
        Sparse RTRL: arXiv 2603.15195 (2026). Menick, J. et al. (2021).
        Practical real time recurrent learning with a sparse approximation.
        ICLR. arXiv:2006.07232.
    """

    name = "sparse_rtrl"

    def __init__(
        self,
        cell: nn.Module,
        *,
        num_paths: int = 4,
        selection: Literal["random", "topk", "adversarial"] = "random",
        keep_self: bool = False,
        resample: int | None = 1,
        rescale: bool = False,
        generator: torch.Generator | int | None = None,
        state_size: int | None = None,
    ) -> None:
        self.num_paths = num_paths
        self.selection = selection
        self.keep_self = keep_self
        self.resample = resample
        self.rescale = rescale
        super().__init__(cell, state_size=state_size)
        self._check_options()
        self.generator = make_generator(generator, self.adapter.device, "SparseRTRL")
        self._scale = self._path_scale()

    # Options ----------------------------------------------------------------

    def _check_options(self) -> None:
        size = self.adapter.state_size
        if isinstance(self.num_paths, bool) or not isinstance(self.num_paths, int):
            raise TypeError(
                f"SparseRTRL: `num_paths` must be an int, got {self.num_paths!r}."
            )
        if not 0 <= self.num_paths <= size:
            raise ValueError(
                f"SparseRTRL: `num_paths` must be in [0, state_size={size}], got "
                f"{self.num_paths}."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"SparseRTRL: unknown `selection` {self.selection!r}; expected one "
                f"of {', '.join(SELECTIONS)}."
            )
        if self.resample is not None and (
            isinstance(self.resample, bool)
            or not isinstance(self.resample, int)
            or self.resample < 1
        ):
            raise ValueError(
                "SparseRTRL: `resample` must be a positive int (redraw every that "
                f"many steps) or None (draw once), got {self.resample!r}."
            )
        if self.rescale and self.selection != "random":
            raise ValueError(
                "SparseRTRL: `rescale=True` applies to selection='random' only (it "
                f"makes a random mask unbiased); got selection={self.selection!r}."
            )

    @property
    def num_drawn(self) -> int:
        """Paths drawn per unit besides a kept self-path."""
        size = self.adapter.state_size
        return min(self.num_paths, size - 1) if self.keep_self else self.num_paths

    def _path_scale(self) -> torch.Tensor:
        """(K_kept,) factor per column of `path_index`: Eq. (3)'s S/K or 1."""
        drawn, size = self.num_drawn, self.adapter.state_size
        candidates = size - 1 if self.keep_self else size
        factor = candidates / drawn if self.rescale and drawn > 0 else 1.0
        scale = [1.0] * int(self.keep_self) + [factor] * drawn
        return torch.tensor(scale, dtype=self.adapter.dtype, device=self.adapter.device)

    # The step ---------------------------------------------------------------

    def _initial_memory(self, batch_size: int | None) -> SparseRTRLState:
        if batch_size is None:
            return SparseRTRLState()
        shape = (batch_size, self.adapter.state_size, self.adapter.num_params)
        return SparseRTRLState(
            state=self.adapter.initial_state(batch_size),
            _current=self._new_tensor(*shape),
        )

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        self._run_update()  # the previous step's, if no backward ran it
        step = self.adapter.step(x, memory.state, jacobian=True)
        jacobian = step.recurrent_jacobian
        if self._redraw_due():
            memory.path_index = self.select_paths(jacobian)
        weight = jacobian.gather(2, memory.path_index) * self._scale
        memory._pending = lambda credit=None: self._update(
            memory, weight, step.immediate, credit
        )
        return step.state

    def _update(self, memory, weight, immediate, credit=None):
        """Eq. (1) along the kept paths plus the immediate part; with a credit
        also Eq. (2) on the result, in the same pass where the backend can."""
        memory._pending = None
        # The "dense" backend multiplies a column-major influence, as `RTRL`
        # does (so k = S stays exact RTRL bit for bit); the gathers read rows.
        column = kernels.prefers_column_major(memory._current, weight.shape[2])
        if kernels.column_major(memory._current) != column:
            memory._current = kernels.with_layout(memory._current, column)
            memory._spare = None
        memory._fused = kernels.fuses_update(
            self.adapter, memory._current, memory.path_index, immediate
        )
        if memory._fused:  # one pass, in place
            out = memory._current
        elif memory._spare is None:
            out = memory._spare = torch.empty_like(memory._current)
        else:
            out = memory._spare
        grad = kernels.sparse_step(
            self.adapter,
            memory._current,
            memory.path_index,
            weight,
            immediate,
            out,
            credit,
        )
        if out is not memory._current:
            memory._current, memory._spare = out, memory._current
        return grad

    def _run_update(self) -> None:
        if self.memory._pending is not None:
            self.memory._pending()

    def _redraw_due(self) -> bool:
        count = self.memory.step_count
        if self.resample is None:
            return self.memory.path_index is None
        return count % self.resample == 0

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        if memory._pending is not None:
            return memory._pending(credit)  # Eq. (1) and (2) together
        # Eq. (2) alone (the update already ran), in the same arithmetic.
        return kernels.sparse_gradient(credit, memory._current, bool(memory._fused))

    def state_dict(self) -> dict[str, Any]:
        self._run_update()
        out = super().state_dict()
        current = self.memory._current
        out["influence"] = None if current is None else current.clone()
        return out

    # Selection --------------------------------------------------------------

    def select_paths(self, recurrent_jacobian: torch.Tensor) -> torch.Tensor:
        """The kept paths of each unit for this J_t: path_index (B, S, K_kept).

        Scores every candidate of a row (uniform noise, |J_ij| or -|J_ij|) and
        keeps the K best; the top K of i.i.d. uniforms is a uniform K-subset.
        For random selection with many candidates and few paths (at least
        `FLOYD_MIN_CANDIDATES`, K at most 1/8 of them) the same uniform
        K-subset is drawn by Floyd's algorithm: K draws per row instead of S.
        """
        batch, size, _ = recurrent_jacobian.shape
        candidates = size - 1 if self.keep_self else size
        if self.selection == "random" and (
            candidates >= FLOYD_MIN_CANDIDATES and 8 * self.num_drawn <= candidates
        ):
            drawn = _floyd_subsets(
                self.generator, batch, size, candidates, self.num_drawn
            )
            drawn = drawn.to(recurrent_jacobian.device)
            if self.keep_self:  # candidate c >= i stands for unit c + 1
                own = torch.arange(size, device=drawn.device).view(1, size, 1)
                drawn += drawn >= own
        else:
            drawn = self._top_scores(recurrent_jacobian)
        if not self.keep_self:
            return drawn
        own = torch.arange(size, device=drawn.device).view(1, size, 1)
        own = own.expand(batch, size, 1)
        return torch.cat((own, drawn), dim=2)

    def _top_scores(self, recurrent_jacobian: torch.Tensor) -> torch.Tensor:
        """The K best-scored candidates per row (with `keep_self`, not the self)."""
        batch, size, _ = recurrent_jacobian.shape
        if self.selection == "random":
            scores = torch.rand(
                batch,
                size,
                size,
                generator=self.generator,
                dtype=self.adapter.dtype,
                device=self.generator.device,
            ).to(recurrent_jacobian.device)
        elif self.selection == "topk":
            scores = recurrent_jacobian.abs()
        else:
            scores = -recurrent_jacobian.abs()
        if self.keep_self:
            scores.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
        return scores.topk(self.num_drawn, dim=2, sorted=False).indices


def _floyd_subsets(
    generator: torch.Generator, batch: int, size: int, candidates: int, drawn: int
) -> torch.Tensor:
    """A uniform `drawn`-subset of range(candidates) per row: (B, S, drawn) int64.

    Floyd's algorithm: for top = N - K, ..., N - 1 draw t uniform in [0, top]
    and keep t, or top when t is already kept; every K-subset is equally likely.
    """
    device = generator.device
    chosen = torch.empty(batch, size, drawn, dtype=torch.long, device=device)
    for j, top in enumerate(range(candidates - drawn, candidates)):
        pick = torch.randint(
            0, top + 1, (batch, size), generator=generator, device=device
        )
        if j > 0:  # the first draw cannot collide
            taken = (chosen[:, :, :j] == pick.unsqueeze(2)).any(dim=2)
            pick = torch.where(taken, top, pick)
        chosen[:, :, j] = pick
    return chosen
