r"""The view of a recurrent cell that forward-mode estimators need.

An estimator never differentiates the cell itself. It asks a `CellAdapter` for
one step of the recurrence together with its two Jacobians:

.. math::
    s_t = f(x_t, s_{t-1}; \theta), \qquad
    J_t = \frac{\partial s_t}{\partial s_{t-1}} \in \mathbb{R}^{S \times S}, \qquad
    \bar I_t = \frac{\partial s_t}{\partial \theta} \in \mathbb{R}^{S \times P}.

The parameters theta are flattened in the order of `cell.named_parameters()`
(for torch's cells: `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`), each
parameter row-major; `CellAdapter.param_slices` gives each one's columns.

For the gated torch cells the immediate Jacobian is never formed densely: a
unit's state depends on the weights of its own gate rows only, so it is stored
compactly as the derivatives of the state with respect to the gate
pre-activations, `GateJacobian`, and added into an influence tensor in place
by `add_immediate`. `dense_immediate` builds the dense (B, S, P) tensor that
this equals (used by tests and diagnostics only).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GateJacobian:
    r"""Compact immediate Jacobian of a gated cell.

    The state has Q blocks of H units (Q = 1 for RNN and GRU, 2 for an LSTM's
    (h, c)); the cell has G gates whose pre-activations are
    `x @ weight_ih.T + bias_ih` (the input part) and `h @ weight_hh.T + bias_hh`
    (the hidden part), each (B, G*H) in torch's gate order.

    Fields:
        wrt_input_preact: (B, S, G), d s_i / d (input part of gate g, unit i mod H).
        wrt_hidden_preact: (B, S, G), the same for the hidden part (differs from
            the input part only in the GRU's candidate gate).
        input: (B, I), the x of this step.
        hidden: (B, H), the h of the previous step.
    """

    wrt_input_preact: torch.Tensor
    wrt_hidden_preact: torch.Tensor
    input: torch.Tensor
    hidden: torch.Tensor


Immediate = GateJacobian | torch.Tensor  # compact, or dense (B, S, P)


@dataclass(frozen=True)
class CellStep:
    """One step of a cell: the new state and its Jacobians.

    Fields:
        state: (B, S), s_t.
        recurrent_jacobian: (B, S, S), J_t = d s_t / d s_{t-1}; None when the
            caller asked for the immediate part only.
        immediate: d s_t / d theta at fixed s_{t-1}, compact or dense (B, S, P).
    """

    state: torch.Tensor
    recurrent_jacobian: torch.Tensor | None
    immediate: Immediate


class CellAdapter(ABC):
    """Analytic access to a recurrent cell: step, Jacobians, parameter layout.

    Attributes:
        cell: the wrapped module (its parameters are read at every step, so an
            optimizer may update them in place).
        input_size, hidden_size, state_size: I, H, S.
        params: the cell's parameters in flattening order.
        param_slices: for each parameter, its columns of the flat P axis.
        num_params: P.
    """

    def __init__(self, cell: nn.Module, *, state_size: int, hidden_size: int) -> None:
        self.cell = cell
        self.state_size = state_size
        self.hidden_size = hidden_size
        self.names = [name for name, _ in cell.named_parameters()]
        self.params = [param for _, param in cell.named_parameters()]
        self.param_slices = _slices([p.numel() for p in self.params])
        # Each parameter's shape and contiguous strides (of a meta tensor: no
        # memory), for its view of a flat (P,) gradient.
        self._layouts = [
            (p.shape, torch.empty(p.shape, device="meta").stride()) for p in self.params
        ]
        self.num_params = sum(p.numel() for p in self.params)
        if self.num_params == 0:
            raise ValueError(
                f"{type(cell).__name__} has no parameters: there is nothing to learn."
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """The zero state, (B, S)."""
        return torch.zeros(
            batch_size, self.state_size, dtype=self.dtype, device=self.device
        )

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        """The part of the state the readout sees, (B, H)."""
        if self.hidden_size == self.state_size:
            return state
        return state[:, : self.hidden_size]

    @abstractmethod
    def step(
        self, x: torch.Tensor, state: torch.Tensor, *, jacobian: bool = True
    ) -> CellStep:
        """Advance the state by one step; with `jacobian=False` J_t is skipped."""

    def add_immediate(self, influence: torch.Tensor, immediate: Immediate) -> None:
        """influence += immediate, in place, without forming a dense copy."""
        if isinstance(immediate, torch.Tensor):
            influence.add_(immediate)
        else:
            self._add_gate_jacobian(influence, immediate)

    def dense_immediate(self, immediate: Immediate) -> torch.Tensor:
        """The dense (B, S, P) immediate Jacobian (for tests and diagnostics)."""
        if isinstance(immediate, torch.Tensor):
            return immediate.clone()
        batch = immediate.input.shape[0]
        dense = torch.zeros(
            batch,
            self.state_size,
            self.num_params,
            dtype=self.dtype,
            device=self.device,
        )
        self._add_gate_jacobian(dense, immediate)
        return dense

    def immediate_vjp(self, immediate: Immediate, vector: torch.Tensor) -> torch.Tensor:
        """vector @ immediate per stream, (B, S) x (B, S, P) -> (B, P).

        For the compact `GateJacobian` this never forms the dense (B, S, P)
        tensor: it costs O(B P) (used by UORO's parameter factor).
        """
        if isinstance(immediate, torch.Tensor):
            return torch.bmm(vector.unsqueeze(1), immediate).squeeze(1)
        u_in, u_hid = self._gate_vjp(immediate, vector)  # (B, G*H, 1) each
        weight_hh = u_hid * immediate.hidden.unsqueeze(1)
        mask = self.hidden_weight_mask()
        if mask is not None:
            weight_hh = weight_hh * mask
        pieces = {
            "weight_ih": u_in * immediate.input.unsqueeze(1),
            "weight_hh": weight_hh,
            "bias_ih": u_in,
            "bias_hh": u_hid,
        }
        return torch.cat([pieces[name].flatten(1) for name in self.names], dim=1)

    def gate_rows_to_flat(self, rows: torch.Tensor) -> torch.Tensor:
        """Flatten per-gate-row parameter blocks (..., G*H, W) into (..., P).

        Row r (torch's gate order, r = g*H + i) holds the parameters of gate row
        r: [weight_ih[r] (I), weight_hh[r] (H), bias_ih[r], bias_hh[r]], the
        biases only when the cell has them (W = I + H + 2, else I + H). For the
        analytic cells only (parameters `weight_ih`, `weight_hh`, `bias_*`).
        """
        size_in = self.cell.weight_ih.shape[1]
        start = {"weight_ih": 0, "weight_hh": size_in}
        start.update(bias_ih=size_in + self.hidden_size)
        start.update(bias_hh=size_in + self.hidden_size + 1)
        width = {"weight_ih": size_in, "weight_hh": self.hidden_size}
        pieces = []
        for name in self.names:
            first = start[name]
            block = rows[..., first : first + width.get(name, 1)]
            pieces.append(block.reshape(*rows.shape[:-2], -1))
        return torch.cat(pieces, dim=-1)

    def _gate_vjp(
        self, jac: GateJacobian, vector: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vector @ d s / d (input, hidden part of each gate row), (B, G*H, 1) each."""
        batch, _, gates = jac.wrt_input_preact.shape
        per_unit = vector.view(batch, -1, self.hidden_size, 1)  # (B, Q, H, 1)

        def per_row(wrt_preact: torch.Tensor) -> torch.Tensor:
            units = wrt_preact.view(batch, -1, self.hidden_size, gates)
            return (per_unit * units).sum(1).transpose(1, 2).reshape(batch, -1, 1)

        return per_row(jac.wrt_input_preact), per_row(jac.wrt_hidden_preact)

    def flat_to_params(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a (..., P) tensor into views shaped like each parameter."""
        if flat.dim() == 1 and flat.stride(0) == 1:  # the hot path: one op each
            base = flat.storage_offset()
            return [
                flat.as_strided(shape, strides, base + cols.start)
                for (shape, strides), cols in zip(
                    self._layouts, self.param_slices, strict=True
                )
            ]
        lead = flat.shape[:-1]
        return [
            flat[..., cols].reshape(*lead, *p.shape)
            for p, cols in zip(self.params, self.param_slices, strict=True)
        ]

    def check_parameters(self) -> None:
        """Raise if the cell's parameters were replaced since the adapter was built."""
        cell = self.cell
        if not cell._modules and _same(cell._parameters.values(), self.params):
            return  # a leaf module (every torch cell): its own parameters only
        if not _same(cell.parameters(), self.params):
            raise RuntimeError(REPLACED_PARAMETERS)

    def _add_gate_jacobian(self, influence: torch.Tensor, jac: GateJacobian) -> None:
        blocks = dict(zip(self.names, self.param_slices, strict=True))
        hidden_mask = self.hidden_weight_mask()
        _add_weight_block(
            influence, blocks["weight_ih"], jac.wrt_input_preact, jac.input, None
        )
        _add_weight_block(
            influence,
            blocks["weight_hh"],
            jac.wrt_hidden_preact,
            jac.hidden,
            hidden_mask,
        )
        if "bias_ih" in blocks:
            _add_bias_block(influence, blocks["bias_ih"], jac.wrt_input_preact)
            _add_bias_block(influence, blocks["bias_hh"], jac.wrt_hidden_preact)

    def hidden_weight_mask(self) -> torch.Tensor | None:
        """An optional fixed 0/1 mask on `weight_hh` (G*H, H); None for dense."""
        return None


REPLACED_PARAMETERS = (
    "The cell's parameters were replaced (not updated in place) after the learner "
    "was built.\nThe learner reads the parameter tensors it found at construction; "
    "`cell.weight_hh = nn.Parameter(...)` or `cell.load_state_dict(..., assign=True)` "
    "creates new ones that it cannot see. Update weights in place "
    "(`with torch.no_grad(): cell.weight_hh.copy_(...)`), or build a new learner."
)


def _same(current, params: list[torch.Tensor]) -> bool:
    """Whether `current` yields exactly the tensors `params` (Nones skipped)."""
    current = [p for p in current if p is not None]
    return len(current) == len(params) and all(
        a is b for a, b in zip(current, params, strict=True)
    )


def _slices(sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def _gate_view(
    influence: torch.Tensor, cols: slice, gates: int, width: int
) -> torch.Tensor:
    """The diagonal (unit i of the state, row i of each gate) of a weight block.

    The block `influence[:, :, cols]` is viewed as (B, Q, H, G, H, width); its
    diagonal over the two H axes is returned as (B, Q, G, width, H), a view.
    """
    batch, state_size, _ = influence.shape
    hidden = (cols.stop - cols.start) // (gates * width)
    blocks = state_size // hidden
    view = influence[:, :, cols].view(batch, blocks, hidden, gates, hidden, width)
    return view.diagonal(dim1=2, dim2=4)


def _add_weight_block(
    influence: torch.Tensor,
    cols: slice,
    wrt_preact: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    # d s_(q,i) / d W[g*H + i, l] = wrt_preact[(q,i), g] * source[l] (* mask)
    batch, state_size, gates = wrt_preact.shape
    width = source.shape[1]
    diag = _gate_view(influence, cols, gates, width)  # (B, Q, G, width, H)
    blocks = diag.shape[1]
    coeff = wrt_preact.view(batch, blocks, -1, gates).permute(0, 1, 3, 2)
    update = coeff.unsqueeze(3) * source[:, None, None, :, None]
    if mask is not None:
        update = update * mask.view(gates, -1, width).transpose(1, 2)
    diag.add_(update)


def _add_bias_block(
    influence: torch.Tensor, cols: slice, wrt_preact: torch.Tensor
) -> None:
    batch, state_size, gates = wrt_preact.shape
    diag = _gate_view(influence, cols, gates, 1).squeeze(3)  # (B, Q, G, H)
    blocks = diag.shape[1]
    diag.add_(wrt_preact.view(batch, blocks, -1, gates).permute(0, 1, 3, 2))
