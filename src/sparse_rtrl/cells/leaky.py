r"""The leaky (continuous-time) RNN cell, the benchmark's default cell."""

import math

import torch
from torch import nn


class LeakyRNNCell(nn.Module):
    r"""A leaky tanh RNN cell: a continuous-time RNN discretised with step `alpha`.

    .. math::
        h' = (1 - \alpha)\, h + \alpha \tanh(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})

    With `alpha = 1` this is `torch.nn.RNNCell` with the tanh nonlinearity. The
    leak keeps `(1 - alpha)` on the diagonal of the recurrent Jacobian, which
    makes it well conditioned (DESIGN.md section 5).

    Args:
        input_size: I, features of the input x.
        hidden_size: H, units of the state h.
        alpha: integration step in (0, 1]. Default 0.2.
        bias: if False, the cell has no `bias_ih` and `bias_hh`. Default True.
        recurrent_mask: optional fixed (H, H) 0/1 connectivity of `weight_hh`;
            the cell uses `weight_hh * recurrent_mask`, so masked weights have
            zero gradient (a sparse recurrent network, as SnAp-2 assumes).
        device, dtype: as for torch modules.

    Shapes:
        x: (B, I); h: (B, H) or None (zeros); output: (B, H).

    Initialisation: every weight and bias from U(-1/sqrt(H), 1/sqrt(H)), as
    `torch.nn.RNNCell` does.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        alpha: float = 0.2,
        bias: bool = True,
        *,
        recurrent_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"LeakyRNNCell: `alpha` must be in (0, 1], got {alpha}.")
        for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
            if int(size) <= 0:
                raise ValueError(
                    f"LeakyRNNCell: `{name}` must be a positive integer, got {size}."
                )
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.alpha = float(alpha)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.register_buffer("recurrent_mask", _check_mask(recurrent_mask, hidden_size))
        self.reset_parameters()

    @property
    def bias(self) -> bool:
        return self.bias_ih is not None

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def effective_weight_hh(self) -> torch.Tensor:
        """`weight_hh` with the connectivity mask applied (H, H)."""
        if self.recurrent_mask is None:
            return self.weight_hh
        return self.weight_hh * self.recurrent_mask

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        preact = nn.functional.linear(x, self.weight_ih, self.bias_ih)
        preact = preact + nn.functional.linear(
            h, self.effective_weight_hh(), self.bias_hh
        )
        return (1.0 - self.alpha) * h + self.alpha * torch.tanh(preact)

    def extra_repr(self) -> str:
        sparse = ", sparse" if self.recurrent_mask is not None else ""
        return (
            f"{self.input_size}, {self.hidden_size}, alpha={self.alpha}, "
            f"bias={self.bias}{sparse}"
        )


def _check_mask(mask: torch.Tensor | None, hidden_size: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != (hidden_size, hidden_size):
        raise ValueError(
            "LeakyRNNCell: `recurrent_mask` must have shape "
            f"({hidden_size}, {hidden_size}), got {tuple(mask.shape)}."
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("LeakyRNNCell: `recurrent_mask` must hold only 0 and 1.")
    return mask.float()
