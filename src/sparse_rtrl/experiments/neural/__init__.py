"""Neural-data BCI experiment: recording loaders, a synthetic generator, C9.

`loaders` reads FALCON M2 and NLB MC_Maze NWB files and O'Doherty-Sabes
MATLAB v7.3 files into binned `Session`s; `synthetic` makes drifting
multi-session recordings; `study` runs the cross-session adaptation (C9).
"""

from .loaders import NeuralDataError, Session, load_session, load_sessions
from .synthetic import Drift, make_sessions


__all__ = [
    "Drift",
    "NeuralDataError",
    "Session",
    "load_session",
    "load_sessions",
    "make_sessions",
]
