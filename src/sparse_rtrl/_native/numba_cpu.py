r"""The fused sparse influence update on the CPU, compiled by numba.

Computes, for every stream b and unit i (Eq. (1) of `SparseRTRL`),

    out[b, i, :] = sum_k path_weight[b, i, k] * influence[b, path_index[b, i, k], :]

column tile by column tile: a tile of the influence (S rows x `tile` columns,
about 2 MiB) stays in the core's cache while all S output rows of that tile
are formed, so each influence row is read from memory once per step however
many paths use it, and each output row is written once (paths are combined
four at a time in registers). The tile size was chosen by measurement on a
2-core AMD EPYC (1 MiB L2, 32 MiB L3): tiles under a page (4 KiB) per row ran
slower. Tiles are split between threads that release the GIL (plain Python
threads, as many as `torch.get_num_threads()`), not numba's own OpenMP pool,
which would compete with torch's for the same cores.

Measured at 1.4-2x the time of `copy_` of the influence (the floor that
`sparse-rtrl bench` compares with), likely because the output rows are
written with ordinary stores, which also read each line, where a large copy
streams its writes.
"""

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import torch


CACHE_BYTES = 2 << 20  # the influence tile kept in cache (L2 to L3)
MIN_TILE_BYTES = 4096  # a page per row: hardware prefetch runs whole pages
MIN_JOB_ELEMENTS = 1 << 16  # below this many outputs per thread, stay serial

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0
_pool_lock = threading.Lock()


@numba.njit(inline="always", fastmath={"contract"}, boundscheck=False)
def _combine_row(rows, index, weight, target, lo, hi):  # pragma: no cover - jit
    # Column slices and a loop from 0 let LLVM vectorise (a lo..hi loop on
    # whole rows keeps negative-index checks and runs scalar, 3x slower).
    width, paths, k = hi - lo, index.shape[0], 0
    while k + 4 <= paths:
        m0, m1 = rows[index[k], lo:hi], rows[index[k + 1], lo:hi]
        m2, m3 = rows[index[k + 2], lo:hi], rows[index[k + 3], lo:hi]
        w0, w1, w2, w3 = weight[k], weight[k + 1], weight[k + 2], weight[k + 3]
        if k == 0:
            for p in range(width):
                target[p] = w0 * m0[p] + w1 * m1[p] + w2 * m2[p] + w3 * m3[p]
        else:
            for p in range(width):
                target[p] += w0 * m0[p] + w1 * m1[p] + w2 * m2[p] + w3 * m3[p]
        k += 4
    while k < paths:
        row, w0 = rows[index[k], lo:hi], weight[k]
        if k == 0:
            for p in range(width):
                target[p] = w0 * row[p]
        else:
            for p in range(width):
                target[p] += w0 * row[p]
        k += 1


def _gather_tiles_py(
    influence, path_index, path_weight, out, tile, first, last
):  # pragma: no cover - jit
    batch, size, num_params = influence.shape
    tiles = (num_params + tile - 1) // tile
    for job in range(first, last):
        b = job // tiles
        lo = (job % tiles) * tile
        hi = min(lo + tile, num_params)
        for i in range(size):
            _combine_row(
                influence[b],
                path_index[b, i],
                path_weight[b, i],
                out[b, i, lo:hi],
                lo,
                hi,
            )


def _compile(function):
    options = {"nogil": True, "fastmath": {"contract"}, "boundscheck": False}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # no writable cache folder: compile at every start
        return numba.njit(cache=False, **options)(function)


_gather_tiles = _compile(_gather_tiles_py)


def tile_width(size: int, itemsize: int) -> int:
    """Columns per tile: S rows of it fill about `CACHE_BYTES` (measured best)."""
    width = CACHE_BYTES // max(size * itemsize, 1)
    return max(MIN_TILE_BYTES // itemsize, width // 16 * 16)


def propagate_sparse(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """`kernels.propagate_sparse` for contiguous CPU float32/float64 tensors, K >= 1."""
    batch, size, num_params = influence.shape
    tile = tile_width(size, influence.element_size())
    jobs = batch * math.ceil(num_params / tile)
    arrays = (
        influence.detach().numpy(),
        path_index.detach().contiguous().numpy(),
        path_weight.detach().contiguous().numpy(),
        out.detach().numpy(),
    )
    workers = min(
        torch.get_num_threads(), jobs, max(1, out.numel() // MIN_JOB_ELEMENTS)
    )
    if workers == 1:
        _gather_tiles(*arrays, tile, 0, jobs)
        return out
    bounds = [jobs * w // workers for w in range(workers + 1)]
    pool = _thread_pool(workers - 1)
    pending = [
        pool.submit(_gather_tiles, *arrays, tile, bounds[w], bounds[w + 1])
        for w in range(1, workers)
    ]
    _gather_tiles(*arrays, tile, bounds[0], bounds[1])
    for future in pending:
        future.result()
    return out


def _thread_pool(size: int) -> ThreadPoolExecutor:
    """The shared worker threads (rebuilt after a fork: threads do not survive it)."""
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_size < size or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="sparse_rtrl")
            _pool_size, _pool_pid = size, os.getpid()
        return _pool
