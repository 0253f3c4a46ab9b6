"""Online gradient estimators; see README.md in this folder for the interface."""

from .base import EstimatorState, OnlineEstimator
from .kf_rtrl import KFRTRL, KFRTRLState
from .readout_only import ReadoutOnly, ReadoutOnlyState
from .registry import ESTIMATORS, get_estimator, make_estimator, support_matrix
from .rflo import RFLO, RFLOState
from .rtrl import RTRL, RTRLState
from .snap import SnAp, SnApState
from .sparse_rtrl import SparseRTRL, SparseRTRLState
from .tbptt import TBPTT, TBPTTState
from .uoro import UORO, UOROState


__all__ = [
    "ESTIMATORS",
    "KFRTRL",
    "RFLO",
    "RTRL",
    "TBPTT",
    "UORO",
    "EstimatorState",
    "KFRTRLState",
    "OnlineEstimator",
    "RFLOState",
    "RTRLState",
    "ReadoutOnly",
    "ReadoutOnlyState",
    "SnAp",
    "SnApState",
    "SparseRTRL",
    "SparseRTRLState",
    "TBPTTState",
    "UOROState",
    "get_estimator",
    "make_estimator",
    "support_matrix",
]
