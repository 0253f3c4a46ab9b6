r"""Any module `cell(x, state) -> state` through `torch.func`.

The Jacobians are computed per stream with `torch.func.jacrev` under `vmap`,
and the immediate Jacobian is dense, (B, S, P): this path is general, not
fast. The state is one tensor (B, S) and the whole state is the hidden output
(H = S). The cell declares `state_size`, or accepts `None` as its initial
state (then the first step calls `cell(x, None)`).
"""

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .base import CellAdapter, CellStep


class FunctionalAdapter(CellAdapter):
    """Generic cells: Jacobians by reverse-mode autodiff of one step per stream."""

    def __init__(self, cell: nn.Module, *, state_size: int | None = None) -> None:
        size = (
            state_size if state_size is not None else getattr(cell, "state_size", None)
        )
        if size is None:
            size = _probe_state_size(cell)
        super().__init__(cell, state_size=int(size), hidden_size=int(size))

    def step(
        self, x: torch.Tensor, state: torch.Tensor, *, jacobian: bool = True
    ) -> CellStep:
        params = dict(zip(self.names, (p.detach() for p in self.params), strict=True))

        def one_stream(theta, x_b, s_b):
            new = functional_call(self.cell, theta, (x_b[None], s_b[None]))[0]
            return new, new

        argnums = (0, 2) if jacobian else (0,)
        jac_fn = vmap(jacrev(one_stream, argnums=argnums, has_aux=True), (None, 0, 0))
        jacs, new_state = jac_fn(params, x, state)
        batch = x.shape[0]
        immediate = torch.cat(
            [jacs[0][name].reshape(batch, self.state_size, -1) for name in self.names],
            dim=2,
        )
        recurrent = jacs[1] if jacobian else None
        return CellStep(new_state, recurrent, immediate)


def _probe_state_size(cell: nn.Module) -> int:
    """Ask a cell that accepts `None` for its state size (one call, no grad)."""
    size = getattr(cell, "input_size", None)
    param = next(cell.parameters())
    if size is None:
        raise TypeError(
            f"{type(cell).__name__}: a generic cell must declare `state_size` (and "
            "`input_size`, to probe it) or be passed `state_size=`; it has neither."
        )
    with torch.no_grad():
        x = torch.zeros(1, size, dtype=param.dtype, device=param.device)
        try:
            out = cell(x, None)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            raise TypeError(
                f"{type(cell).__name__}: it declares no `state_size` and failed on "
                f"`cell(x, None)` ({error}); give it a `state_size` attribute."
            ) from error
    return int(out.shape[-1])
