"""sparse-rtrl: exact and sparse real-time recurrent learning for PyTorch.

learner = sparse_rtrl.SparseRTRL(cell, num_paths=4)
h = learner.step(x)                 # (B, I) -> (B, H), a leaf
learner.backward(loss_fn(readout(h), y))
opt.step(); opt.zero_grad()
"""

from .cells import LeakyRNNCell, adapt
from .estimators import (
    ESTIMATORS,
    KFRTRL,
    RFLO,
    RTRL,
    TBPTT,
    UORO,
    OnlineEstimator,
    ReadoutOnly,
    SnAp,
    SparseRTRL,
    get_estimator,
    make_estimator,
)


__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "KFRTRL",
    "RFLO",
    "RTRL",
    "TBPTT",
    "UORO",
    "LeakyRNNCell",
    "OnlineEstimator",
    "ReadoutOnly",
    "SnAp",
    "SparseRTRL",
    "adapt",
    "get_estimator",
    "make_estimator",
]
