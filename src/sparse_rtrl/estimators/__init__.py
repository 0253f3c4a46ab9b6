"""Online gradient estimators; see README.md in this folder for the interface."""

from .base import EstimatorState, OnlineEstimator
from .registry import ESTIMATORS, get_estimator, make_estimator, support_matrix
from .rtrl import RTRL, RTRLState
from .sparse_rtrl import SparseRTRL, SparseRTRLState


__all__ = [
    "ESTIMATORS",
    "RTRL",
    "EstimatorState",
    "OnlineEstimator",
    "RTRLState",
    "SparseRTRL",
    "SparseRTRLState",
    "get_estimator",
    "make_estimator",
    "support_matrix",
]
