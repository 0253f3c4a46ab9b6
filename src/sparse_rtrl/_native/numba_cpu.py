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
slower.

Tiles are split between threads by a `prange` over equal runs of them, on
numba's "omp" threading layer where it loads (it is asked for first, unless
the environment variable NUMBA_THREADING_LAYER chooses). That layer runs on
the GNU OpenMP runtime torch itself uses, so the kernel's threads are torch's
own: with plain Python threads (the first version) or numba's "workqueue"
layer, torch's OpenMP workers, which spin for a few ms after every
multithreaded op, took the core from the kernel's second thread, and the
fused step at n=256 took 13.7 ms on 2 threads instead of 7.8 ms (the same
code with OMP_WAIT_POLICY=PASSIVE). In a forked child the kernel runs on one
thread, since OpenMP's threads do not survive a fork.

In place (`out` is `influence`), each tile is first copied into a scratch
tile that stays in the core's L2 and the new rows are written back over the
lines just read; out of place, the new rows go to a second buffer. In place
is about as fast as out of place, with half the memory.

While a tile's rows are formed, the next tile's rows are prefetched into L2
(`llvm.prefetch`, one row of the next tile per output row), so reading the
influence from memory overlaps the arithmetic instead of waiting for it: a
tile's S rows lie a whole influence row apart, one short run per row, which
the hardware prefetcher starts afresh each time. Alternated in one process
with the same kernel without it, the in-place update took 10-25 % less time
(n = 256: 6.3-7.1 -> 5.7-5.9 ms; n = 512: 57-58 -> 43-44 ms, against
20-35 ms for `copy_` of the influence, the floor `sparse-rtrl bench` compares
with).

With a credit c_t, the gradient c_t M_t is formed in the same pass, so the
new influence is never read back from memory.
"""

import math
import os
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic


if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

CACHE_BYTES = 2 << 20  # the influence tile kept in cache (L2 to L3)
MIN_TILE_BYTES = 4096  # a page per row: hardware prefetch runs whole pages
MIN_JOB_ELEMENTS = 1 << 16  # below this many outputs per thread, stay serial
IN_PLACE_CACHE_BYTES = 512 << 10  # the scratch copy of a tile, in place (L2)
_IMPORT_PID = os.getpid()
_scratch_cache = threading.local()


@intrinsic
def _prefetch_intrinsic(typingctx, array, index):  # pragma: no cover - jit
    # llvm.prefetch of array[index] into the L2 cache (read, locality 2).
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer2(
            context,
            builder,
            view.data,
            cgutils.unpack_tuple(builder, view.shape),
            cgutils.unpack_tuple(builder, view.strides),
            array_type.layout,
            [args[1]],
            wraparound=False,
            boundscheck=False,
        )
        byte_pointer = cgutils.voidptr_t
        int32 = ir.IntType(32)
        function_type = ir.FunctionType(
            ir.VoidType(), [byte_pointer, int32, int32, int32]
        )
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer], function_type
        )
        address = builder.bitcast(pointer, byte_pointer)
        builder.call(prefetch, [address, int32(0), int32(2), int32(1)])
        return context.get_dummy_value()

    return numba.types.void(array, index), codegen


@numba.njit(inline="always", boundscheck=False)
def _tile_bounds(job, tile, num_params):  # pragma: no cover - jit
    # Job j is column tile j % tiles of stream j // tiles: (b, lo, hi).
    tiles = (num_params + tile - 1) // tile
    lo = (job % tiles) * tile
    return job // tiles, lo, min(lo + tile, num_params)


@numba.njit(inline="always", boundscheck=False)
def _prefetch_row(row, lo, hi):  # pragma: no cover - jit
    # One prefetch per 64-byte cache line of row[lo:hi] (none if lo >= hi).
    for p in range(lo, hi, max(1, 64 // row.itemsize)):
        _prefetch_intrinsic(row, p)


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
    order,
    values,
    credit,
    grad,
    scratch,
    tile,
    first,
    last,
):  # pragma: no cover - jit
    # Row i of a tile: the K paths, then the immediate entries of unit i that
    # fall in the tile (columns (S, E) sorted per unit, values[b, i, order[i, e]]
    # the entry of columns[i, e]; E = 0 for none), then with a credit (B, S)
    # grad[b, lo:hi] += credit[b, i] * the finished row, all while the row is
    # still in cache. With a scratch (S, tile) the update runs in place (`out`
    # is `influence`): the tile is copied into it first and read from there.
    batch, size, num_params = influence.shape
    fused = credit.shape[0] > 0
    in_place = scratch.shape[0] > 0
    entries = columns.shape[0] > 0
    # cursor[i]: unit i's first entry at or after the tile's first column. A
    # thread's tiles of a stream run left to right, so a tile starts where the
    # previous one stopped; a bisection only at its first tile of each stream.
    cursor = np.zeros(size, np.int64)
    for job in range(first, last):
        b, lo, hi = _tile_bounds(job, tile, num_params)
        if entries and (job == first or lo == 0):
            for i in range(size):
                cursor[i] = np.searchsorted(columns[i], lo)
        # This thread's next tile is prefetched a row per output row, so its
        # reads are spread over this tile's work (none after the last job).
        ahead = min(job + 1, last - 1)
        next_b, next_lo, next_hi = _tile_bounds(ahead, tile, num_params)
        if ahead == job:
            next_hi = next_lo
        rows, start = influence[b], lo  # where the tile's rows are read from
        if in_place:
            for i in range(size):
                _copy_row(influence[b, i, lo:hi], scratch[i, : hi - lo])
            rows, start = scratch, 0
        for i in range(size):
            _prefetch_row(influence[next_b, i], next_lo, next_hi)
            target = out[b, i, lo:hi]
            _combine_row(
                rows,
                path_index[b, i],
                path_weight[b, i],
                target,
                start,
                start + hi - lo,
            )
            if entries:  # the unit's entries inside the tile (columns sorted)
                unit_columns, e = columns[i], cursor[i]
                while e < unit_columns.shape[0] and unit_columns[e] < hi:
                    target[unit_columns[e] - lo] += values[b, i, order[i, e]]
                    e += 1
                cursor[i] = e
            if fused:
                _add_row(grad[b, lo:hi], credit[b, i], target)


@numba.njit(inline="always", boundscheck=False)
def _copy_row(source, target):  # pragma: no cover - jit
    for p in range(target.shape[0]):
        target[p] = source[p]


@numba.njit(inline="always", fastmath={"contract"}, boundscheck=False)
def _add_row(total, c, row):  # pragma: no cover - jit
    for p in range(total.shape[0]):
        total[p] += c * row[p]


def _gradient_tiles_py(influence, credit, grad, tile, first, last):  # pragma: no cover
    # The gradient of `_gather_tiles_py` alone, in its order of operations.
    batch, size, num_params = influence.shape
    for job in range(first, last):
        b, lo, hi = _tile_bounds(job, tile, num_params)
        for i in range(size):
            _add_row(grad[b, lo:hi], credit[b, i], influence[b, i, lo:hi])


def _compile(function, parallel=False):
    options = {"nogil": True, "fastmath": {"contract"}, "boundscheck": False}
    try:
        return numba.njit(cache=True, parallel=parallel, **options)(function)
    except RuntimeError:  # no writable cache folder: compile at every start
        return numba.njit(cache=False, parallel=parallel, **options)(function)


_gather_tiles = _compile(_gather_tiles_py)
_gradient_tiles = _compile(_gradient_tiles_py)


def _gather_split_py(
    influence,
    path_index,
    path_weight,
    out,
    columns,
    order,
    values,
    credit,
    grad,
    scratch,
    tile,
    jobs,
    workers,
):  # pragma: no cover - jit
    # `workers` equal runs of jobs on numba's thread pool (see the module doc),
    # each with its own scratch tile.
    for w in numba.prange(workers):
        _gather_tiles(
            influence,
            path_index,
            path_weight,
            out,
            columns,
            order,
            values,
            credit,
            grad,
            scratch[w],
            tile,
            jobs * w // workers,
            jobs * (w + 1) // workers,
        )


def _gradient_split_py(
    influence, credit, grad, tile, jobs, workers
):  # pragma: no cover
    for w in numba.prange(workers):
        _gradient_tiles(
            influence,
            credit,
            grad,
            tile,
            jobs * w // workers,
            jobs * (w + 1) // workers,
        )


_gather_split = _compile(_gather_split_py, parallel=True)
_gradient_split = _compile(_gradient_split_py, parallel=True)


def tile_width(size: int, itemsize: int, in_place: bool = False) -> int:
    """Columns per tile. Reading the influence directly, S rows of a tile fill
    about `CACHE_BYTES`, at least a page per row; in place, the scratch copy
    of the tile fills about `IN_PLACE_CACHE_BYTES` (half the core's L2, the
    next tile's prefetch taking the other half), at least half a page per
    row (both measured best on the machine above)."""
    budget, least = (
        (IN_PLACE_CACHE_BYTES, MIN_TILE_BYTES // 2)
        if in_place
        else (CACHE_BYTES, MIN_TILE_BYTES)
    )
    width = budget // max(size * itemsize, 1)
    return max(least // itemsize, width // 16 * 16)


def propagate_sparse(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
    immediate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    credit: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`kernels.propagate_sparse` for contiguous CPU float32/float64 tensors, K >= 1.

    `out` is either a buffer distinct from `influence` or `influence` itself
    (the update then runs in place, tile by tile through a cached scratch
    copy: no second influence buffer, and each cache line of the influence is
    read once and written back once). `immediate` (columns (S, E) int64,
    sorted within each row; order (S, E), the entry of values (B, S, E) that
    each column takes) adds each unit's E immediate entries at their parameter
    columns in the same pass. With `credit` (B, S) it returns the gradient
    sum_b credit_b @ out_b (P,), formed while each finished row is in cache
    (`out` is not read again); else None.
    """
    in_place = out.data_ptr() == influence.data_ptr()
    if immediate is None:
        columns = order = torch.empty(0, 0, dtype=torch.long)
        values = influence.new_empty(1, 0, 0)
    else:
        columns, order, values = immediate
        values = values.contiguous()
    grad, credit = _gradient_buffers(influence, credit)
    arrays = (
        influence.detach().numpy(),
        path_index.detach().contiguous().numpy(),
        path_weight.detach().contiguous().numpy(),
        out.detach().numpy(),
        columns.contiguous().numpy(),
        order.contiguous().numpy(),
        values.detach().numpy(),
        credit.numpy(),
        grad.numpy(),
    )
    tile = tile_width(influence.shape[1], influence.element_size(), in_place)
    jobs, workers = _split(influence, tile)
    rows = influence.shape[1] if in_place else 0
    scratch = _scratch(workers, rows, tile, influence.dtype)
    if workers == 1:
        _gather_tiles(*arrays, scratch[0], tile, 0, jobs)
    else:
        _gather_split(*arrays, scratch, tile, jobs, workers)
    return _total(grad) if grad.numel() else None


def influence_gradient(credit: torch.Tensor, influence: torch.Tensor) -> torch.Tensor:
    """sum_b credit_b @ influence_b (P,) in the arithmetic of `propagate_sparse`'s
    own gradient (the same sums in the same order, bit for bit)."""
    grad, credit = _gradient_buffers(influence, credit)
    arrays = (influence.detach().numpy(), credit.numpy(), grad.numpy())
    tile = tile_width(influence.shape[1], influence.element_size())
    jobs, workers = _split(influence, tile)
    if workers == 1:
        _gradient_tiles(*arrays, tile, 0, jobs)
    else:
        _gradient_split(*arrays, tile, jobs, workers)
    return _total(grad)


def _total(grad: torch.Tensor) -> torch.Tensor:
    """sum over streams of grad (B, P), a fresh (P,) tensor (a view for B = 1)."""
    return grad[0] if grad.shape[0] == 1 else grad.sum(0)


def _gradient_buffers(influence: torch.Tensor, credit: torch.Tensor | None):
    """(grad (B, P) zeros, credit (B, S)) or two empty arrays without a credit."""
    if credit is None:
        return influence.new_empty(0, 0), influence.new_empty(0, 0)
    credit = credit.detach().to(influence.dtype).contiguous()
    return influence.new_zeros(influence.shape[0], influence.shape[2]), credit


def _split(influence: torch.Tensor, tile: int) -> tuple[int, int]:
    """(jobs, workers): one job per column tile of every stream, run by up to
    `torch.get_num_threads()` threads (one in a forked child, where GNU
    OpenMP's threads do not survive; numba's count set to match)."""
    batch, _, num_params = influence.shape
    jobs = batch * math.ceil(num_params / tile)
    workers = min(
        torch.get_num_threads(),
        numba.config.NUMBA_NUM_THREADS,
        jobs,
        max(1, influence.numel() // MIN_JOB_ELEMENTS),
    )
    if os.getpid() != _IMPORT_PID:
        workers = 1
    if workers > 1:
        numba.set_num_threads(workers)
    return jobs, workers


def _scratch(workers: int, rows: int, tile: int, dtype: torch.dtype) -> np.ndarray:
    """A (workers, rows, tile) array kept between calls (per calling thread):
    a fresh 1-2 MiB buffer every step would page-fault on every first touch."""
    key = (workers, rows, tile, dtype)
    cached = getattr(_scratch_cache, "buffer", None)
    if cached is None or cached[0] != key:
        array = torch.empty(workers, rows, tile, dtype=dtype).numpy()
        _scratch_cache.buffer = cached = (key, array)
    return cached[1]
