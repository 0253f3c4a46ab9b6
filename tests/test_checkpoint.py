"""The divergence guard, the interrupt guard and checkpoint files."""

import math
import os
import signal

import pytest
import torch

from sparse_rtrl.experiments import checkpoint
from sparse_rtrl.experiments.runner import Diverged


def test_loss_checks():
    guard = checkpoint.DivergenceGuard(max_loss=10.0)
    guard.check_loss(3, 9.5)
    with pytest.raises(Diverged, match=r"step 4: the loss is nan \(non-finite\)"):
        guard.check_loss(4, math.nan)
    with pytest.raises(Diverged, match=r"step 5: the loss 12 exceeds run.max_loss=10"):
        guard.check_loss(5, 12.0)


def test_tensor_checks_run_every_n_steps():
    guard = checkpoint.DivergenceGuard(check_every=10, max_norm=100.0)
    bad = {"influence": torch.tensor([1.0, math.inf])}
    guard.check_tensors(7, bad)  # not a checking step: skipped, cheap
    with pytest.raises(Diverged, match=r"step 10: the influence holds non-finite"):
        guard.check_tensors(10, bad)
    with pytest.raises(Diverged, match=r"step 20: the state exploded"):
        guard.check_tensors(20, {"state": torch.tensor([1e3])})


def test_interrupt_guard_turns_a_signal_into_a_flag():
    with checkpoint.InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_checkpoint_round_trip_and_config_check(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, {"config_hash": "abc", "position": 7, "x": torch.ones(3)})
    loaded = checkpoint.load(path, config_hash="abc")
    assert loaded["position"] == 7 and torch.equal(loaded["x"], torch.ones(3))
    assert checkpoint.load(tmp_path / "none.pt", config_hash="abc") is None
    with pytest.raises(ValueError, match=r"belongs to another config"):
        checkpoint.load(path, config_hash="xyz")
