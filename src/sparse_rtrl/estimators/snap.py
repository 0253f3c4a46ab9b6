r"""SnAp-n: RTRL restricted to the influence entries reachable in n steps."""

import dataclasses
from typing import final

import torch
from torch import nn

from .. import kernels
from ..cells.analytic import ElmanAdapter, LSTMAdapter
from ..cells.base import GateJacobian
from ..cells.functional import FunctionalAdapter
from .base import EstimatorState, OnlineEstimator


# Probe points for the Jacobian patterns of a generic cell (see `_probe`).
NUM_PROBES = 3


@dataclasses.dataclass
class SnApState(EstimatorState):
    """Fields (besides `state` and `step_count`):
    influence: (B, S, P), the masked influence (dense path); None on the
        compact path.
    influence_compact: (B, S, G, W), SnAp-1's influence on the compact path:
        entry [b, s, g, :] holds d s / d (parameters of gate row g*H + s mod H)
        in the layout of `CellAdapter.gate_rows_to_flat`
        ([weight_ih row (I), weight_hh row (H), bias_ih, bias_hh], W = I + H
        + 2 with biases); None on the dense path.
    _spare: (B, S, P), the buffer M_{t+1} is written into (dense path).
    """

    influence: torch.Tensor | None = None
    influence_compact: torch.Tensor | None = None
    _spare: torch.Tensor | None = None


@final
class SnAp(OnlineEstimator):
    r"""SnAp-n (`order=n`): RTRL keeping the influence entries reachable in n steps.

    Exact RTRL fills the whole influence matrix M_t = d s_t / d theta.
    SnAp-n keeps the entries of M_t that are structurally nonzero after n
    steps of the recursion started from M_0 = 0 (the sparsity pattern of the
    immediate Jacobian, spread n - 1 times through that of J_t), and drops
    the rest at every step:

    .. math::
        \Pi_1 = \mathrm{nz}(\bar I), \quad
        \Pi_n = \Pi_1 \lor (\mathrm{nz}(J)\, \Pi_{n-1})                 \qquad (1)

        M_t = \Pi_n \odot (J_t M_{t-1} + \bar I_t), \quad M_0 = 0        \qquad (2)

        g_t = c_t M_t                                                   \qquad (3)

    The influence mask Pi_n (S, P), `influence_mask`, is built once from the
    cell's structure: for the analytic cells from the gate layout and the
    optional `recurrent_mask` of `LeakyRNNCell` (the leak and an LSTM's
    c -> c path put the diagonal into nz(J)); for a generic cell from the
    Jacobians at a few random probe points (an entry counts when it is nonzero
    at any of them).

    SnAp-1 keeps, for each unit, only the parameters of its own gate rows, so
    only the diagonal (per-unit) blocks of J_t matter; for the analytic cells
    it is stored compactly, per state unit s and gate g the W = I + H (+2)
    parameters of row g*H + (s mod H):

    .. math::
        M^{c}_t[s, g] = \Pi_1[s, g] \sum_{s' \sim s} J_t[s, s']\, M^{c}_{t-1}[s', g]
            + \bar I^{c}_t[s, g]                                        \qquad (4)

    where s' ~ s runs over the Q states of the same unit (Q = 1 for RNN and
    GRU; h and c for an LSTM). For a vanilla or leaky RNN this is the
    diagonal recursion M[i] <- J_ii M[i] + d_i [x, h, 1, 1].

    Properties: biased (it drops the entries outside Pi_n), deterministic. An
    order at which Pi_n stops growing (at most S) gives exact RTRL; with a
    diagonal recurrent weight matrix SnAp-1 is exact. SnAp-1 (compact):
    memory O(B S G (I+H)) = O(B Q P), i.e. O(B P) for RNN and GRU; compute
    O(B Q P) for (4) plus the per-unit blocks of J_t (O(B S) for RNN-type
    cells, O(B S^2) where the adapter forms J_t). Orders >= 2 and generic
    cells (dense masked): memory O(B S P); compute O(B S^2 P), as exact
    RTRL. Supports every cell.

    Args:
        cell: the recurrent cell.
        order: n >= 1, the SnAp order (`order=n` means SnAp-n).

    Limitations: orders >= 2 run the dense product J_t M_{t-1} and mask it, so
    they cost as much as exact RTRL; a sparse product that skips the dropped
    entries would cost O(B |Pi_n| S) instead. For a generic cell the pattern
    is read numerically at probe points, so an entry that happens to vanish at
    every probe (e.g. a relu unit inactive at all of them) is dropped.

    References:
        Menick, J., Elsen, E., Evci, U., Osindero, S., Simonyan, K. and
        Graves, A. (2021). Practical real time recurrent learning with a
        sparse approximation. ICLR. arXiv:2006.07232.
    """

    name = "snap"

    def __init__(
        self, cell: nn.Module, *, order: int = 1, state_size: int | None = None
    ) -> None:
        self.order = _check_order(order)
        super().__init__(cell, state_size=state_size)
        self.compact = order == 1 and not _is_generic(self.adapter)
        self.influence_mask = self._influence_mask()  # (S, P) 0/1, Eq. (1)
        self._gate_mask = self._gate_pattern().to(self.adapter.dtype)  # (S, G)

    # Patterns, Eq. (1) --------------------------------------------------------

    def _influence_mask(self) -> torch.Tensor:
        immediate, recurrent = self._patterns()
        pattern = immediate
        for _ in range(self.order - 1):
            reached = recurrent.to(torch.float64) @ pattern.to(torch.float64)
            pattern = immediate | (reached > 0)
        return pattern.to(self.adapter.dtype)

    def _patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Structural nonzeros of the immediate (S, P) and recurrent (S, S) Jacobian."""
        if _is_generic(self.adapter):
            return self._probe()
        adapter, size = self.adapter, self.adapter.state_size
        gates = self._gate_pattern().to(adapter.dtype)[None]
        factory = {"dtype": adapter.dtype, "device": adapter.device}
        ones_in = torch.ones(1, adapter.cell.weight_ih.shape[1], **factory)
        ones_hidden = torch.ones(1, adapter.hidden_size, **factory)
        unit = GateJacobian(gates, gates, ones_in, ones_hidden)
        immediate = adapter.dense_immediate(unit)[0] != 0
        return immediate, _recurrent_pattern(adapter, size)

    def _gate_pattern(self) -> torch.Tensor:
        """(S, G) bool: which gate rows reach each state unit directly."""
        adapter = self.adapter
        if _is_generic(adapter):
            return torch.ones(adapter.state_size, 1, dtype=torch.bool)
        gates = adapter.cell.weight_ih.shape[0] // adapter.hidden_size
        pattern = torch.ones(adapter.state_size, gates, dtype=torch.bool)
        if isinstance(adapter, LSTMAdapter):
            pattern[adapter.hidden_size :, 3] = False  # c' does not use gate o
        return pattern.to(adapter.device)

    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.adapter
        gen = torch.Generator(device="cpu").manual_seed(0)
        size_in = getattr(adapter.cell, "input_size", None)
        if size_in is None:
            raise TypeError(
                f"SnAp: the generic cell {type(adapter.cell).__name__} must declare "
                "`input_size` so that its Jacobian pattern can be probed."
            )
        immediate = recurrent = None
        for _ in range(NUM_PROBES):
            x = torch.randn(1, size_in, generator=gen, dtype=adapter.dtype)
            state = torch.randn(
                1, adapter.state_size, generator=gen, dtype=adapter.dtype
            )
            step = adapter.step(x.to(adapter.device), state.to(adapter.device))
            imm = adapter.dense_immediate(step.immediate)[0] != 0
            rec = step.recurrent_jacobian[0] != 0
            immediate = imm if immediate is None else immediate | imm
            recurrent = rec if recurrent is None else recurrent | rec
        return immediate, recurrent

    # The step ---------------------------------------------------------------

    def _initial_memory(self, batch_size: int | None) -> SnApState:
        if batch_size is None:
            return SnApState()
        state = self.adapter.initial_state(batch_size)
        if self.compact:
            gates, width = self._compact_shape()
            compact = self._new_tensor(
                batch_size, self.adapter.state_size, gates, width
            )
            return SnApState(state=state, influence_compact=compact)
        shape = (batch_size, self.adapter.state_size, self.adapter.num_params)
        return SnApState(
            state=state,
            influence=self._new_tensor(*shape),
            _spare=self._new_tensor(*shape),
        )

    def _compact_shape(self) -> tuple[int, int]:
        cell = self.adapter.cell
        gates = cell.weight_ih.shape[0] // self.adapter.hidden_size
        width = cell.weight_ih.shape[1] + self.adapter.hidden_size
        return gates, width + (2 if "bias_ih" in self.adapter.names else 0)

    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        first = memory.step_count == 0
        if self.compact:
            # An Elman cell's diagonal of J_t is read without forming J_t.
            elman = isinstance(self.adapter, ElmanAdapter)
            step = self.adapter.step(x, memory.state, jacobian=not (first or elman))
            self._advance_compact(step, first)
            return step.state
        step = self.adapter.step(x, memory.state, jacobian=not first)

        # Eq. (2): propagate, add the immediate Jacobian, then mask.
        if first:
            memory._spare.zero_()
        else:
            kernels.propagate_exact(
                step.recurrent_jacobian, memory.influence, memory._spare
            )
        self.adapter.add_immediate(memory._spare, step.immediate)
        memory._spare.mul_(self.influence_mask)
        memory.influence, memory._spare = memory._spare, memory.influence
        return step.state

    def _advance_compact(self, step, first: bool) -> None:
        # Eq. (4): per-unit blocks of J_t, then the compact immediate Jacobian.
        influence = self.memory.influence_compact  # (B, S, G, W)
        if not first:
            self._propagate_compact(step, influence)
        jac = step.immediate
        size_in, hidden = jac.input.shape[1], self.adapter.hidden_size
        influence[..., :size_in].addcmul_(
            jac.wrt_input_preact.unsqueeze(3), jac.input[:, None, None, :]
        )
        source = jac.hidden[:, None, None, :]
        mask = self.adapter.hidden_weight_mask()
        if mask is not None:  # row g*H + i of the mask, for unit (q, i)
            rows = mask.view(-1, hidden, hidden).transpose(0, 1)  # (H, G, H)
            source = source * rows.repeat(influence.shape[1] // hidden, 1, 1)
        influence[..., size_in : size_in + hidden].addcmul_(
            jac.wrt_hidden_preact.unsqueeze(3), source
        )
        if influence.shape[3] > size_in + hidden:
            influence[..., size_in + hidden].add_(jac.wrt_input_preact)
            influence[..., size_in + hidden + 1].add_(jac.wrt_hidden_preact)

    def _propagate_compact(self, step, influence: torch.Tensor) -> None:
        recurrent_jacobian = step.recurrent_jacobian
        batch, size = influence.shape[:2]
        hidden = self.adapter.hidden_size
        blocks = size // hidden
        if recurrent_jacobian is None:  # Elman: J_ii = (1 - alpha) + d_i W_ii
            diagonal = _elman_diagonal(self.adapter, step.immediate)
            influence.mul_(diagonal[:, :, None, None])
            return
        if blocks == 1:
            diagonal = recurrent_jacobian.diagonal(dim1=1, dim2=2)  # (B, S)
            influence.mul_(diagonal[:, :, None, None])
            return
        per_unit = recurrent_jacobian.view(batch, blocks, hidden, blocks, hidden)
        per_unit = per_unit.diagonal(dim1=2, dim2=4)  # (B, Q, Q, H)
        view = influence.view(batch, blocks, hidden, *influence.shape[2:])
        mixed = torch.einsum("bqrh,brhgw->bqhgw", per_unit, view)
        influence.copy_(mixed.reshape(influence.shape))
        influence.mul_(self._gate_mask[:, :, None])

    def _gradient(self, credit: torch.Tensor) -> torch.Tensor:
        # Eq. (3).
        if not self.compact:
            return kernels.influence_gradient(credit, self.memory.influence)
        influence = self.memory.influence_compact
        batch, size, gates, width = influence.shape
        hidden = self.adapter.hidden_size
        rows = torch.einsum(
            "bqh,bqhgw->ghw",
            credit.view(batch, -1, hidden),
            influence.view(batch, -1, hidden, gates, width),
        )
        return self.adapter.gate_rows_to_flat(rows.reshape(gates * hidden, width))


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"SnAp: `order` must be an int >= 1, got {order!r}.")
    if order < 1:
        raise ValueError(
            f"SnAp: `order` must be >= 1 (order=n means SnAp-n), got {order}. "
            "For the immediate Jacobian only, use SparseRTRL(num_paths=0)."
        )
    return order


def _is_generic(adapter) -> bool:
    return isinstance(adapter, FunctionalAdapter)


def _elman_diagonal(adapter: ElmanAdapter, immediate: GateJacobian) -> torch.Tensor:
    """diag(J) (B, H) of an Elman cell: (1 - alpha) + d_i W_hh[i, i]."""
    weight = adapter.cell.weight_hh.diagonal()
    mask = adapter.hidden_weight_mask()
    if mask is not None:
        weight = weight * mask.diagonal()
    return immediate.wrt_hidden_preact[:, :, 0] * weight + (1.0 - adapter.alpha)


def _recurrent_pattern(adapter, size: int) -> torch.Tensor:
    """Structural nonzeros of J (S, S) for the analytic cells."""
    device = adapter.device
    pattern = torch.ones(size, size, dtype=torch.bool, device=device)
    eye = torch.eye(size, dtype=torch.bool, device=device)
    if isinstance(adapter, ElmanAdapter):
        mask = adapter.hidden_weight_mask()
        if mask is not None:
            pattern = (mask != 0).to(device)
        if adapter.alpha != 1.0:
            pattern = pattern | eye
    elif isinstance(adapter, LSTMAdapter):
        hidden = adapter.hidden_size
        pattern[:, hidden:] = eye[:, hidden:]  # c feeds only its own h and c
        pattern[:hidden, hidden:] = eye[hidden:, hidden:]
    return pattern
