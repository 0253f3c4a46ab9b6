r"""Checkpoints of an online run, interruption handling and the divergence guard.

An online run is a long stream; stopping and resuming it must not change its
result. A checkpoint holds everything the rest of the stream depends on: the
cell and readout parameters, the learner's record (state, influence, path
mask, mask generator), the optimizer's state, the position in the stream and
the losses recorded so far. The streams themselves are regenerated from the
run seed, so they are not stored. Checkpoints are written atomically (a
temporary file, then a rename), so a kill at any moment leaves either the
previous checkpoint or the new one.

`InterruptGuard` turns SIGINT and SIGTERM into a flag the online loop reads at
the next step boundary: the loop then saves a checkpoint and raises
`Interrupted`, and `sparse-rtrl run ... --resume` continues from it.

`DivergenceGuard` stops a run whose loss is non-finite (checked every step) or
above `max_loss`, or whose state or influence is non-finite or larger than
`max_norm` (checked every `check_every` steps, so the check stays cheap next
to the influence update), with a message naming the step and what blew up.
"""

import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from . import runio
from .runner import Diverged


CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
RESUME_VARIABLE = "SPARSE_RTRL_RESUME"  # "1": continue from checkpoints
# Test hook: behave as if SIGINT arrived after this many steps of a run.
INTERRUPT_VARIABLE = "SPARSE_RTRL_INTERRUPT_AFTER"


def resume_enabled() -> bool:
    """Whether runs continue from their checkpoints (`sparse-rtrl run --resume`
    and `reproduce` set this; otherwise an interrupted run starts over)."""
    return os.environ.get(RESUME_VARIABLE, "") == "1"


def interrupt_hook() -> int | None:
    """The step count after which the test hook interrupts a run, if set."""
    value = os.environ.get(INTERRUPT_VARIABLE)
    return int(value) if value else None


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal after saving a checkpoint."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (`payload` holds tensors and plain data)."""
    runio.atomic_torch_save(Path(path), {"format": FORMAT_VERSION, **payload})


def load(path: Path, *, config_hash: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it exists and belongs to this config."""
    path = Path(path)
    if not path.exists():
        return None
    payload = torch.load(path, weights_only=False)
    if payload.get("config_hash") != config_hash:
        raise ValueError(
            f"{path}: this checkpoint belongs to another config (hash "
            f"{str(payload.get('config_hash'))[:12]}, this run {config_hash[:12]}); "
            "delete it or resume with the config it was written by."
        )
    return payload


class InterruptGuard:
    """While active, SIGINT and SIGTERM set `requested` instead of killing.

    A second signal while a request is pending raises KeyboardInterrupt at
    once (an impatient user still gets out). Outside the main thread (a pool
    or Dask worker) signals cannot be caught and the guard does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


class DivergenceGuard:
    """Stop a run that blew up (see the module docstring).

    Args:
        check_every: steps between the (state, influence) checks; 0 turns
            them off (the loss is still checked every step).
        max_loss: a finite loss above this is divergence too (None: no bound).
        max_norm: largest |value| allowed in the state and the learner's
            tensors (None: only finiteness).
    """

    def __init__(
        self,
        *,
        check_every: int = 50,
        max_loss: float | None = None,
        max_norm: float | None = 1e8,
    ) -> None:
        self.check_every = check_every
        self.max_loss = max_loss
        self.max_norm = max_norm

    def check_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"step {step}: the loss is {loss} (non-finite)")
        if self.max_loss is not None and loss > self.max_loss:
            raise Diverged(
                f"step {step}: the loss {loss:.4g} exceeds run.max_loss="
                f"{self.max_loss:g}"
            )

    def due(self, step: int) -> bool:
        """Whether `step` is a step of the (state, influence) check."""
        return self.check_every > 0 and step % self.check_every == 0

    def check_tensors(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        if not self.due(step):
            return
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise Diverged(f"step {step}: the {name} holds non-finite values")
            size = tensor.detach().abs().max().item() if tensor.numel() else 0.0
            if self.max_norm is not None and size > self.max_norm:
                raise Diverged(
                    f"step {step}: the {name} exploded (max |value| {size:.3g} > "
                    f"run.max_norm={self.max_norm:g})"
                )


def learner_tensors(learner: Any) -> dict[str, torch.Tensor]:
    """The floating tensors a learner carries between steps, by field name."""
    memory = getattr(learner, "memory", None)
    if memory is not None:
        fields = vars(memory)
    else:
        fields = {"state": getattr(learner, "state", None)}
    return {
        name.lstrip("_"): value
        for name, value in fields.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not name.startswith("_")
    }
