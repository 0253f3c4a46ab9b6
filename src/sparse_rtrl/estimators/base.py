r"""The interface every online gradient estimator implements.

An estimator wraps a recurrent cell and runs it one step at a time:

    h = learner.step(x)                     # x (B, I) -> h (B, H), a fresh leaf
    loss = loss_fn(readout(h), y)
    learner.backward(loss)                  # readout grads by autograd, cell
    opt.step(); opt.zero_grad()             # grads by the estimator

`backward` runs `loss.backward()`, reads the credit c_t = dL_t/dh_t from the
latest h only, and adds the estimator's gradient into each cell parameter's
`.grad`. Subclasses implement four hooks: `_initial_memory` (allocate the
state record for B streams), `_advance` (one step of the recurrence and of
the estimator's own memory), `_gradient` (the flat (P,) gradient for a credit)
and, optionally, `_check_options`. Everything an estimator carries between
steps lives in one dataclass record, `learner.memory`, whose fields give
their shapes.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..cells import CELL_KINDS, CellAdapter, adapt, cell_kind


SMALL_INPUT = 64  # inputs up to this many values are checked as Python floats
BACKWARD_BEFORE_STEP = (
    "{name}.backward was called before any step since the last reset.\n"
    "The estimator adds c_t M_t for the hidden state returned by the latest "
    "`step`; there is none yet. Call `h = learner.step(x)`, compute the loss "
    "from h, then `learner.backward(loss)`."
)


@dataclasses.dataclass
class EstimatorState:
    """What every estimator carries between steps.

    Fields:
        state: (B, S) recurrent state s_t; None before the first step.
        step_count: steps taken since the last reset.
    """

    state: torch.Tensor | None = None
    step_count: int = 0


class OnlineEstimator(ABC):
    """Abstract base of the online gradient estimators (see the module doc).

    Class attributes of a concrete estimator:
        name: its registry key.
        supported_cells: the cell kinds it works with (`cells.CELL_KINDS`).
        exact: whether its gradient equals BPTT's.
    """

    name: ClassVar[str]
    supported_cells: ClassVar[tuple[str, ...]] = CELL_KINDS
    exact: ClassVar[bool] = False

    def __init__(self, cell: nn.Module, *, state_size: int | None = None) -> None:
        self.cell = cell
        self.adapter: CellAdapter = adapt(cell, state_size=state_size)
        self._check_cell()
        self.memory: Any = self._initial_memory(None)
        self.hidden: torch.Tensor | None = None  # (B, H) leaf of the latest step

    # The online loop -------------------------------------------------------

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Advance every stream by one step; return h_t (B, H) as a fresh leaf."""
        self._check_input(x)
        if self.memory.state is None:
            self.memory = self._initial_memory(x.shape[0])
        self.adapter.check_parameters()

        with torch.no_grad():
            self.memory.state = self._advance(x)
        self.memory.step_count += 1

        hidden = self.adapter.hidden(self.memory.state)
        self.hidden = hidden.detach().clone().requires_grad_(True)
        return self.hidden

    def backward(self, loss: torch.Tensor | None = None) -> None:
        """Backpropagate `loss` and add the cell's gradient into `.grad`.

        Args:
            loss: a scalar computed from the latest h. None means the caller
                already ran `loss.backward()` and only the cell gradient is due.
        """
        if self.hidden is None:
            raise RuntimeError(BACKWARD_BEFORE_STEP.format(name=type(self).__name__))
        if loss is not None:
            loss.backward()
        credit, self.hidden.grad = self.hidden.grad, None
        if credit is None:
            return  # the loss does not depend on h: no cell gradient

        with torch.no_grad():
            grad = self._gradient(self._state_credit(credit))
            if grad is not None:
                self._accumulate(grad)

    def reset(self) -> None:
        """Forget the state, the estimator's memory and the step count."""
        self.memory = self._initial_memory(None)
        self.hidden = None

    # Serialisation ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The memory record (tensors cloned) and, for a stochastic estimator,
        its generator's state; not the cell's parameters."""
        out = {}
        generator = getattr(self, "generator", None)
        if generator is not None:
            out["generator_state"] = generator.get_state()
        for field in dataclasses.fields(self.memory):
            value = getattr(self.memory, field.name)
            if field.name.startswith("_"):
                continue  # scratch buffers are not state
            out[field.name] = (
                value.clone() if isinstance(value, torch.Tensor) else value
            )
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a record saved by `state_dict`."""
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        if generator_state is not None:
            self.generator.set_state(generator_state)
        batch = None if state_dict["state"] is None else state_dict["state"].shape[0]
        memory = self._initial_memory(batch)
        for name, value in state_dict.items():
            if not hasattr(memory, name):
                raise KeyError(
                    f"{type(self).__name__}.load_state_dict: unknown entry `{name}`; "
                    f"expected {sorted(self.state_dict())}."
                )
            current = getattr(memory, name)
            if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                current.copy_(value)
            else:
                setattr(memory, name, value)
        self.memory = memory
        self.hidden = None

    # Cost -------------------------------------------------------------------

    @property
    def memory_floats(self) -> int:
        """Floats held between steps by the estimator (its tensors)."""
        return sum(
            value.numel()
            for value in vars(self.memory).values()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        )

    # Hooks ------------------------------------------------------------------

    @abstractmethod
    def _initial_memory(self, batch_size: int | None) -> EstimatorState:
        """A fresh record for B streams (None: an empty one, before any step)."""

    @abstractmethod
    def _advance(self, x: torch.Tensor) -> torch.Tensor:
        """One step: update `self.memory` in place and return s_t (B, S)."""

    @abstractmethod
    def _gradient(self, credit: torch.Tensor) -> torch.Tensor | None:
        """The flat gradient (P,) for the state credit (B, S), summed over B: a
        new tensor (`.grad` may receive views of it), or None for none."""

    # Helpers ----------------------------------------------------------------

    def _state_credit(self, credit: torch.Tensor) -> torch.Tensor:
        """Pad dL/dh (B, H) to dL/ds (B, S) (an LSTM's c gets no direct credit)."""
        size = self.adapter.state_size
        if credit.shape[1] == size:
            return credit
        full = credit.new_zeros(credit.shape[0], size)
        full[:, : credit.shape[1]] = credit
        return full

    def _accumulate(self, grad: torch.Tensor) -> None:
        # `grad` is a fresh tensor of this call: a parameter without a gradient
        # can take a view of it (no copy); the others add it in.
        for param, piece in zip(
            self.adapter.params, self.adapter.flat_to_params(grad), strict=True
        ):
            if param.grad is None:
                param.grad = piece
            else:
                param.grad.add_(piece)

    def _new_tensor(self, *shape: int) -> torch.Tensor:
        adapter = self.adapter
        return torch.zeros(*shape, dtype=adapter.dtype, device=adapter.device)

    def _check_cell(self) -> None:
        kind = cell_kind(self.cell)
        if kind not in self.supported_cells:
            from .registry import supporting

            raise NotImplementedError(
                f"{type(self).__name__} supports {', '.join(self.supported_cells)}; "
                f"got {type(self.cell).__name__}. Estimators that support {kind}: "
                f"{', '.join(supporting(kind))}."
            )

    def _check_input(self, x: torch.Tensor) -> None:
        who = f"{type(self).__name__}.step"
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{who}: `x` must be a torch.Tensor, got {type(x).__name__}."
            )
        size = getattr(self.cell, "input_size", None)
        if x.dim() != 2 or (size is not None and x.shape[1] != size):
            raise ValueError(
                f"{who}: `x` must have shape (B, input_size={size}), got "
                f"{tuple(x.shape)}. For a single stream, use x.unsqueeze(0)."
            )
        if x.dtype != self.adapter.dtype:
            raise TypeError(
                f"{who}: `x` has dtype {x.dtype} but the cell's parameters are "
                f"{self.adapter.dtype}; convert with x.to({self.adapter.dtype})."
            )
        if x.device != self.adapter.device:
            raise ValueError(
                f"{who}: `x` is on {x.device} but the cell is on "
                f"{self.adapter.device}; move it with x.to('{self.adapter.device}')."
            )
        state = self.memory.state
        if state is not None and x.shape[0] != state.shape[0]:
            raise ValueError(
                f"{who}: `x` has batch size {x.shape[0]} but the learner runs "
                f"{state.shape[0]} streams; call reset() to change the batch size."
            )
        if not _all_finite(x):
            raise ValueError(
                f"{who}: `x` holds non-finite values (NaN or inf) at step "
                f"{self.memory.step_count}; clean the input stream."
            )


def _all_finite(x: torch.Tensor) -> bool:
    # x is (B, I). On the CPU without a torch op (a per-step cost at small n):
    # a few values through Python floats, more through numpy.
    if x.device.type == "cpu":
        if x.numel() <= SMALL_INPUT:
            return all(math.isfinite(v) for row in x.tolist() for v in row)
        if x.dtype in (torch.float32, torch.float64):
            return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def make_generator(
    generator: torch.Generator | int | None, device: torch.device, who: str
) -> torch.Generator:
    """A torch.Generator from a generator, an int seed, or None (a seed drawn
    from torch's global generator, so `torch.manual_seed` makes it repeatable)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = int(torch.randint(0, 2**62, (1,)))
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"{who}: `generator` must be a torch.Generator, an int seed or None, "
            f"got {type(generator).__name__}."
        )
    return torch.Generator(device=device).manual_seed(generator)
