"""Optional compiled kernels (numba), used by `sparse_rtrl.kernels` when present.

Nothing here is imported by `import sparse_rtrl`: `kernels` asks `numba_available()`
at the first sparse update and imports `numba_cpu` only then. Install the extra
with `pip install "sparse-rtrl[fast]"`; without it the pure-torch path runs.
"""

import functools
import importlib.util


@functools.cache
def numba_available() -> bool:
    """Whether numba can be imported (without importing it; asked once)."""
    return importlib.util.find_spec("numba") is not None
