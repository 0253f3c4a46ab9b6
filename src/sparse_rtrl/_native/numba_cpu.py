r"""The fused sparse influence update on the CPU, compiled by numba.

Computes, for every stream b and unit i (Eq. (1) of `SparseRTRL`),

    out[b, i, :] = sum_k path_weight[b, i, k] * influence[b, path_index[b, i, k], :]

column tile by column tile: a tile of the influence (S rows x `tile` columns,
about 2 MiB) stays in the core's cache while all S output rows of that tile
are formed, so each influence row is read from memory once per step however
many paths use it, and each output row is written once (paths are combined
four at a time in registers); the unit's immediate entries, when given, are
added to its row in the same pass. The tile size was chosen by measurement on a
2-core AMD EPYC (1 MiB L2, 32 MiB L3): tiles under a page (4 KiB) per row ran
slower. Tiles are split between threads that release the GIL (plain Python
threads, as many as `torch.get_num_threads()`), not numba's own OpenMP pool,
which would compete with torch's for the same cores.

Measured at 1.3-2x the time of `copy_` of the influence (the floor that
`sparse-rtrl bench` compares with), likely because the output rows are
written with ordinary stores, which also read each line, where a large copy
streams its writes. With a credit c_t, the gradient c_t M_t is formed in the
same pass: in an online loop at n=256 (k=4, 2 threads) that took the step
from about 24-27 ms (a separate `torch.mm` reading the new influence back from
memory) to 19.5 ms.
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
    influence,
    path_index,
    path_weight,
    out,
    columns,
    values,
    credit,
    grad,
    tile,
    first,
    last,
):  # pragma: no cover - jit
    # Row i of a tile: the K paths, then the immediate entries of unit i that
    # fall in the tile (columns (S, E), values (B, S, E); E = 0 for none),
    # then with a credit (B, S) grad[b, lo:hi] += credit[b, i] * the finished
    # row, all while the row is still in cache.
    batch, size, num_params = influence.shape
    tiles = (num_params + tile - 1) // tile
    fused = credit.shape[0] > 0
    for job in range(first, last):
        b = job // tiles
        lo = (job % tiles) * tile
        hi = min(lo + tile, num_params)
        for i in range(size):
            target = out[b, i, lo:hi]
            _combine_row(
                influence[b], path_index[b, i], path_weight[b, i], target, lo, hi
            )
            for e in range(columns.shape[1]):
                col = columns[i, e]
                if lo <= col < hi:
                    target[col - lo] += values[b, i, e]
            if fused:
                _add_row(grad[b, lo:hi], credit[b, i], target)


@numba.njit(inline="always", fastmath={"contract"}, boundscheck=False)
def _add_row(total, c, row):  # pragma: no cover - jit
    for p in range(total.shape[0]):
        total[p] += c * row[p]


def _gradient_tiles_py(influence, credit, grad, tile, first, last):  # pragma: no cover
    # The gradient of `_gather_tiles_py` alone, in its order of operations.
    batch, size, num_params = influence.shape
    tiles = (num_params + tile - 1) // tile
    for job in range(first, last):
        b = job // tiles
        lo = (job % tiles) * tile
        hi = min(lo + tile, num_params)
        for i in range(size):
            _add_row(grad[b, lo:hi], credit[b, i], influence[b, i, lo:hi])


def _compile(function):
    options = {"nogil": True, "fastmath": {"contract"}, "boundscheck": False}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # no writable cache folder: compile at every start
        return numba.njit(cache=False, **options)(function)


_gather_tiles = _compile(_gather_tiles_py)
_gradient_tiles = _compile(_gradient_tiles_py)


def tile_width(size: int, itemsize: int) -> int:
    """Columns per tile: S rows of it fill about `CACHE_BYTES` (measured best)."""
    width = CACHE_BYTES // max(size * itemsize, 1)
    return max(MIN_TILE_BYTES // itemsize, width // 16 * 16)


def propagate_sparse(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
    immediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    credit: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`kernels.propagate_sparse` for contiguous CPU float32/float64 tensors, K >= 1.

    `immediate` (columns (S, E) int64, values (B, S, E)) adds each unit's E
    immediate entries at their parameter columns in the same pass. With
    `credit` (B, S) it returns the gradient sum_b credit_b @ out_b (P,),
    formed while each finished row is in cache (`out` is not read again);
    else None.
    """
    if immediate is None:
        columns = torch.empty(0, 0, dtype=torch.long)
        values = influence.new_empty(1, 0, 0)
    else:
        columns, values = immediate[0].contiguous(), immediate[1].contiguous()
    grad, credit = _gradient_buffers(influence, credit)
    arrays = (
        influence.detach().numpy(),
        path_index.detach().contiguous().numpy(),
        path_weight.detach().contiguous().numpy(),
        out.detach().numpy(),
        columns.numpy(),
        values.detach().numpy(),
        credit.numpy(),
        grad.numpy(),
    )
    _run_tiles(_gather_tiles, arrays, influence)
    return grad.sum(0) if grad.numel() else None


def influence_gradient(credit: torch.Tensor, influence: torch.Tensor) -> torch.Tensor:
    """sum_b credit_b @ influence_b (P,) in the arithmetic of `propagate_sparse`'s
    own gradient (the same sums in the same order, bit for bit)."""
    grad, credit = _gradient_buffers(influence, credit)
    arrays = (influence.detach().numpy(), credit.numpy(), grad.numpy())
    _run_tiles(_gradient_tiles, arrays, influence)
    return grad.sum(0)


def _gradient_buffers(influence: torch.Tensor, credit: torch.Tensor | None):
    """(grad (B, P) zeros, credit (B, S)) or two empty arrays without a credit."""
    if credit is None:
        return influence.new_empty(0, 0), influence.new_empty(0, 0)
    credit = credit.detach().to(influence.dtype).contiguous()
    return influence.new_zeros(influence.shape[0], influence.shape[2]), credit


def _run_tiles(kernel, arrays, influence: torch.Tensor) -> None:
    """Run `kernel(*arrays, tile, first, last)` over every column tile of every
    stream, split between up to `torch.get_num_threads()` threads."""
    batch, size, num_params = influence.shape
    tile = tile_width(size, influence.element_size())
    jobs = batch * math.ceil(num_params / tile)
    workers = min(
        torch.get_num_threads(), jobs, max(1, influence.numel() // MIN_JOB_ELEMENTS)
    )
    if workers == 1:
        kernel(*arrays, tile, 0, jobs)
        return
    bounds = [jobs * w // workers for w in range(workers + 1)]
    pool = _thread_pool(workers - 1)
    pending = [
        pool.submit(kernel, *arrays, tile, bounds[w], bounds[w + 1])
        for w in range(1, workers)
    ]
    kernel(*arrays, tile, bounds[0], bounds[1])
    for future in pending:
        future.result()


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
