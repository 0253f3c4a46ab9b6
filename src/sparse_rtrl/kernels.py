r"""The influence-update kernels: the hottest path of the library.

Every forward-mode estimator with a dense (B, S, P) influence spends its step
here. Each function writes into a preallocated `out` (double buffering: no
allocation per step) and is the single place a faster implementation plugs in.

- `propagate_exact`: out = J M, a batched matmul, Eq. (1) of `RTRL`.
- `new_influence`, `column_major`, `with_layout`: the two storage orders of a
  (B, S, P) influence (below).
- `propagate_sparse`: out[b, i] = sum_j w[b, i, j] M[b, idx[b, i, j]], Eq. (1)
  of `SparseRTRL`, through the fastest backend available (below).
- `propagate_sparse_reference`: the same, written as the plain loop over the K
  paths with one row gather each. Every fast backend is tested against it.
- `add_immediate`: M += the immediate Jacobian, for a compact `GateJacobian`
  in one scatter-add instead of the adapter's per-block strided adds (the
  same entries; a per-op-overhead saving at small n).
- `influence_gradient`: g = sum_b c_b M_b, the (P,) gradient.
- `sparse_step`: `propagate_sparse` and `add_immediate`, and optionally the
  gradient of the result, in one pass where the backend can (`fuses_update`);
  `sparse_gradient`: that gradient later, in the same arithmetic.

Backends of `propagate_sparse` (`set_backend`, `use_backend`, or the
environment variable `SPARSE_RTRL_KERNELS`):

- "numba": a fused tiled gather compiled by numba (the `fast` extra), CPU
  float32/float64. It reads each influence row from memory once per step,
  however many paths use it, and writes each output row once; the memory
  floor of any dense-storage update is 2 B S P bytes-per-element. Through
  `sparse_step` it runs in place (each column tile is first copied to a
  scratch that stays in the core's cache), so `SparseRTRL` keeps one
  influence buffer instead of two.
- "torch": the same tiling in pure torch (one gather, multiply and sum per
  column tile), on any device. The default where numba is absent.
- "dense": scatter the K weights of each row into a dense (B, S, S) matrix
  and multiply it like `propagate_exact`: S^2 P flops at matmul speed, which
  beats any gather once K is a large enough fraction of S. With every path
  kept (K = S, unit weights) the matrix is J_t itself, so the update is
  bitwise the exact one.
- "reference": `propagate_sparse_reference`.
- "auto" (the default): "dense" when K >= `DENSE_MIN_FRACTION` * S, else
  "numba" for CPU float32/float64 tensors when numba is installed, else
  "torch". The crossover was measured on the 2-core CPU (float32, B=1, 2
  threads): at S=64 the gather takes 0.35 / 0.67 ms at K=16 / 32 and the
  dense product 0.57 / 0.60 ms; at S=256, K=64 the gather takes 79 ms and the
  dense product 129 ms.

Storage order. An influence is always a (B, S, P) tensor, stored either
row-major (contiguous: each unit's row of P entries in one run, what the
gathers of the "numba", "torch" and "reference" backends read) or
column-major (a (B, P, S) buffer seen through its transposed view).
`exact_column_major` says which order exact RTRL's product J M runs in: on
the CPU, up to `COLUMN_MAJOR_MAX_STATE` units, column-major. MKL multiplies
that shape faster (2-core CPU, float32, the product alone: n = 64 197 against
245 us, n = 96 0.93 against 1.11 ms, n = 192 16.8 against 18.6 ms), but the
gradient c_t M_t, a product with rows of only S entries there, runs slower
(n = 64 28 against 23 us, n = 192 3.3 against 0.8 ms, n = 256 7.9 against
2.6 ms). Over the whole online step, alternated in one process: n = 64
0.62-0.69 against 0.70-0.74 ms, n = 96 1.63 against 2.18 ms, n = 128 the same
to 3 %, n = 160-192 3-6 % slower (docs/performance.md). `RTRL` stores its
influence in that order, and so does `SparseRTRL` while it runs the "dense"
backend, which keeps k = S exact RTRL's own product, bit for bit.
`add_immediate` and `influence_gradient` take either order.

The update needs no autograd: the estimators call it under `torch.no_grad()`.
"""

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch

from ._native import numba_available
from .cells.base import CellAdapter, GateJacobian, Immediate


BACKENDS = ("auto", "numba", "torch", "dense", "reference")
ENVIRONMENT_VARIABLE = "SPARSE_RTRL_KERNELS"
GATHER_BYTES = 4 << 20  # gathered rows per column tile of the "torch" backend
CUDA_GATHER_BYTES = 256 << 20
DENSE_MIN_FRACTION = 0.5  # "auto" multiplies densely from K = S / 2 on (measured)
COLUMN_MAJOR_MAX_STATE = 128  # exact RTRL's influence column-major up to here

_backend: str | None = None  # None: read the environment variable
_immediate_index: "weakref.WeakKeyDictionary[CellAdapter, torch.Tensor]" = (
    weakref.WeakKeyDictionary()
)
_ones: "weakref.WeakKeyDictionary[CellAdapter, torch.Tensor]" = (
    weakref.WeakKeyDictionary()
)
_column_index: "weakref.WeakKeyDictionary[CellAdapter, torch.Tensor]" = (
    weakref.WeakKeyDictionary()
)
_ColumnsAndOrder = tuple[torch.Tensor, torch.Tensor]
_immediate_columns: "weakref.WeakKeyDictionary[CellAdapter, _ColumnsAndOrder]" = (
    weakref.WeakKeyDictionary()
)


def propagate_exact(
    recurrent_jacobian: torch.Tensor, influence: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = J @ M. Shapes: J (B, S, S), M and out (B, S, P), both row-major
    or both column-major (`torch.bmm` runs on either without a copy)."""
    return torch.bmm(recurrent_jacobian, influence, out=out)


def new_influence(
    batch: int,
    size: int,
    num_params: int,
    *,
    column_major: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A zero (B, S, P) influence, stored row-major or column-major (the
    transposed view of a contiguous (B, P, S) buffer; see the module doc)."""
    if not column_major:
        return torch.zeros(batch, size, num_params, dtype=dtype, device=device)
    buffer = torch.zeros(batch, num_params, size, dtype=dtype, device=device)
    return buffer.transpose(1, 2)


def exact_column_major(size: int, device: torch.device) -> bool:
    """Whether exact RTRL's influence of S = `size` units is stored
    column-major on `device` (measured on the CPU only; see the module doc)."""
    return device.type == "cpu" and size <= COLUMN_MAJOR_MAX_STATE


def prefers_column_major(influence: torch.Tensor, paths: int) -> bool:
    """Whether `propagate_sparse` with `paths` (K) runs on a column-major
    influence: with the "dense" backend, whose product is `propagate_exact`'s,
    where exact RTRL's runs column-major."""
    return (
        paths > 0
        and exact_column_major(influence.shape[1], influence.device)
        and resolve_backend(influence, paths) == "dense"
    )


def column_major(influence: torch.Tensor) -> bool:
    """Whether a (B, S, P) influence is stored column-major and not also
    row-major (with S = 1 or P = 1 the two orders are one)."""
    # Read from the strides (no view made: this runs every step).
    batch, size, num_params = influence.shape
    batch_stride, unit_stride, param_stride = influence.stride()
    return (
        size > 1
        and num_params > 1
        and (unit_stride, param_stride) == (1, size)
        and (batch == 1 or batch_stride == size * num_params)
    )


def with_layout(influence: torch.Tensor, column: bool) -> torch.Tensor:
    """`influence` in the asked storage order: itself, or a copy (same values)."""
    if column_major(influence) == column:
        return influence
    batch, size, num_params = influence.shape
    out = new_influence(
        batch,
        size,
        num_params,
        column_major=column,
        dtype=influence.dtype,
        device=influence.device,
    )
    return out.copy_(influence)


def propagate_sparse(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[b, i] = sum_j path_weight[b, i, j] * influence[b, path_index[b, i, j]].

    Shapes: influence and out (B, S, P), distinct buffers in one storage
    order, row-major for every backend but "dense" (which takes either);
    path_index (B, S, K) int64; path_weight (B, S, K). K = 0 gives zeros.
    Runs the backend `resolve_backend` picks for these tensors.
    """
    if path_index.shape[2] == 0:
        return out.zero_()
    backend = resolve_backend(influence, path_index.shape[2])
    if backend != "dense" and not (influence.is_contiguous() and out.is_contiguous()):
        raise ValueError(
            f"kernels.propagate_sparse: the {backend!r} backend reads rows and "
            "needs row-major (contiguous) `influence` and `out`; got a "
            "column-major or strided one. Pass `kernels.with_layout(x, False)`."
        )
    if backend == "numba":
        from ._native import numba_cpu

        numba_cpu.propagate_sparse(influence, path_index, path_weight, out)
        return out
    if backend == "torch":
        return _propagate_sparse_tiled(influence, path_index, path_weight, out)
    if backend == "dense":
        return _propagate_sparse_dense(influence, path_index, path_weight, out)
    return propagate_sparse_reference(influence, path_index, path_weight, out)


def sparse_step(
    adapter: CellAdapter,
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    immediate: Immediate,
    out: torch.Tensor,
    credit: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """out = `propagate_sparse` + the immediate Jacobian (Eq. (1) of
    `SparseRTRL`); with `credit` (B, S) also returns the gradient
    sum_b credit_b @ out_b (P,), else None.

    Where `fuses_update(...)` holds (the "numba" backend, a compact immediate
    Jacobian) it is one pass: each output row gets its K paths, then its
    unit's immediate entries, then (with a credit) joins the gradient while it
    is in cache, so the new influence is written once and never read back;
    `out` may then be `influence` itself (in place: no second buffer, the
    same numbers). `sparse_gradient` gives that gradient later, bit for bit.
    Otherwise the three run one after the other, into a distinct `out`.
    """
    if not fuses_update(adapter, influence, path_index, immediate):
        if out.data_ptr() == influence.data_ptr():
            raise ValueError(
                "kernels.sparse_step: `out` is `influence`, but the "
                f"{resolve_backend(influence, path_index.shape[2])!r} path cannot "
                "update in place; pass a distinct buffer (in place needs "
                "`fuses_update`)."
            )
        propagate_sparse(influence, path_index, path_weight, out)
        add_immediate(adapter, out, immediate)
        return None if credit is None else influence_gradient(credit, out)
    from ._native import numba_cpu

    columns, order = _gate_columns(adapter, immediate, influence.device)
    values = _gate_values(adapter, immediate).reshape(
        influence.shape[0], *columns.shape
    )
    return numba_cpu.propagate_sparse(
        influence, path_index, path_weight, out, (columns, order, values), credit
    )


def sparse_gradient(
    credit: torch.Tensor, influence: torch.Tensor, fused: bool
) -> torch.Tensor:
    """g = sum_b credit_b @ influence_b for an influence `sparse_step` made;
    `fused` (its `fuses_update`) picks the arithmetic of that step's own
    gradient, so the result does not depend on when it is asked for."""
    if not fused:
        return influence_gradient(credit, influence)
    from ._native import numba_cpu

    return numba_cpu.influence_gradient(credit, influence)


def fuses_update(
    adapter: CellAdapter,
    influence: torch.Tensor,
    path_index: torch.Tensor,
    immediate: Immediate,
) -> bool:
    """Whether `sparse_step` runs as one pass for these arguments."""
    paths = path_index.shape[2]
    return (
        paths > 0
        and resolve_backend(influence, paths) == "numba"
        and _gate_index(adapter, immediate, influence.device) is not None
    )


def propagate_sparse_reference(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """`propagate_sparse` as a loop over the K paths (the tests' reference)."""
    batch, size, num_params = influence.shape
    rows = influence.view(batch * size, num_params)
    offset = torch.arange(batch, device=influence.device).mul_(size).view(batch, 1)
    flat_out = out.view(batch * size, num_params)
    flat_out.zero_()
    for j in range(path_index.shape[2]):
        source = (path_index[:, :, j] + offset).reshape(-1)
        flat_out.addcmul_(
            path_weight[:, :, j].reshape(-1, 1), rows.index_select(0, source)
        )
    return out


def influence_gradient(credit: torch.Tensor, influence: torch.Tensor) -> torch.Tensor:
    """g = sum_b credit_b @ influence_b. Shapes: credit (B, S), influence (B, S, P)
    in either storage order."""
    batch, size, num_params = influence.shape
    if batch > 1 and column_major(influence):  # rows of streams do not merge
        return torch.bmm(credit.unsqueeze(1), influence).sum(0)[0]
    flat = influence.reshape(-1, num_params)  # a view (B = 1 or row-major)
    return torch.mm(credit.reshape(1, batch * size), flat)[0]


def add_immediate(
    adapter: CellAdapter, influence: torch.Tensor, immediate: Immediate
) -> None:
    r"""influence += immediate, in place: `adapter.add_immediate` in fewer ops.

    For a compact `GateJacobian` of an analytic cell without a connectivity
    mask, the entries (unit s = (q, i), gate g, column l of a parameter row)
    are written by one `index_add_` at the flat positions of
    `CellAdapter._add_gate_jacobian`'s layout, q S P + start + (g H + i) W + l:

        weight_ih: wrt_input_preact[s, g] input[l],
        weight_hh: wrt_hidden_preact[s, g] hidden[l],
        bias_ih: wrt_input_preact[s, g], bias_hh: wrt_hidden_preact[s, g].

    In a column-major influence the same entry sits at q S P + p S + s for
    its column p and unit s. Anything else (a dense immediate, a masked cell)
    goes to the adapter.
    """
    index = _gate_index(adapter, immediate, influence.device)
    if index is None:
        adapter.add_immediate(influence, immediate)
        return
    values = _gate_values(adapter, immediate)
    batch = influence.shape[0]
    if column_major(influence):
        influence = influence.transpose(1, 2)  # the contiguous (B, P, S) buffer
        index = _column_major_index(adapter, index)
    influence.view(batch, -1).index_add_(1, index, values.view(batch, -1))


def _column_major_index(adapter: CellAdapter, index: torch.Tensor) -> torch.Tensor:
    """`_gate_index`'s positions s P + p moved to p S + s (cached per adapter)."""
    cached = _column_index.get(adapter)
    if cached is None or cached.device != index.device:
        size, num_params = adapter.state_size, adapter.num_params
        cached = (index % num_params) * size + index // num_params
        _column_index[adapter] = cached
    return cached


def _gate_columns(
    adapter: CellAdapter, immediate: GateJacobian, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter columns (S, E) of each unit's compact immediate entries,
    sorted within each unit, and the entry (S, E) of `_gate_values`' last
    axis that each sorted column takes (so a kernel can find a tile's entries
    by bisection)."""
    cached = _immediate_columns.get(adapter)
    if cached is None or cached[0].device != device:
        index = _gate_index(adapter, immediate, device)
        columns = (index % adapter.num_params).view(adapter.state_size, -1)
        cached = columns.sort(dim=1)
        _immediate_columns[adapter] = cached
    return cached


def _gate_values(adapter: CellAdapter, immediate: GateJacobian) -> torch.Tensor:
    """The compact entries (B, S, G, W) in the order of `_gate_index`."""
    wrt_input = immediate.wrt_input_preact.unsqueeze(3)  # (B, S, G, 1)
    if immediate.wrt_hidden_preact is immediate.wrt_input_preact:
        # RNN and LSTM: one coefficient per gate row, times the row
        # [x, h, 1, 1] of its parameters (the same products, in fewer ops).
        row = _parameter_row(adapter, immediate)
        return wrt_input * row.view(row.shape[0], 1, 1, -1)
    wrt_hidden = immediate.wrt_hidden_preact.unsqueeze(3)
    blocks = {
        "weight_ih": wrt_input * immediate.input[:, None, None, :],
        "weight_hh": wrt_hidden * immediate.hidden[:, None, None, :],
        "bias_ih": wrt_input,
        "bias_hh": wrt_hidden,
    }
    return torch.cat([blocks[name] for name in adapter.names], dim=3)


def _parameter_row(adapter: CellAdapter, immediate: GateJacobian) -> torch.Tensor:
    """(B, W): what multiplies a gate row's coefficient in each of its
    parameters, in the compact layout's order: x, h, then 1 for each bias."""
    x, h = immediate.input, immediate.hidden
    biases = len(adapter.names) - 2
    if biases == 0:
        return torch.cat((x, h), dim=1)
    ones = _ones.get(adapter)
    if ones is None or (ones.shape[0], ones.dtype, ones.device) != (
        x.shape[0],
        x.dtype,
        x.device,
    ):
        ones = _ones[adapter] = x.new_ones(x.shape[0], biases)
    return torch.cat((x, h, ones), dim=1)


def _gate_index(
    adapter: CellAdapter, immediate: Immediate, device: torch.device
) -> torch.Tensor | None:
    """Flat (S P) positions of the compact immediate's entries, or None."""
    if not isinstance(immediate, GateJacobian) or not _compact_layout(adapter):
        return None
    index = _immediate_index.get(adapter)
    if index is not None and index.device == device:
        return index
    size, hidden = adapter.state_size, adapter.hidden_size
    gates = immediate.wrt_input_preact.shape[2]
    widths = {
        "weight_ih": immediate.input.shape[1],
        "weight_hh": hidden,
        "bias_ih": 1,
        "bias_hh": 1,
    }
    unit = torch.arange(size)[:, None, None]  # s
    gate = torch.arange(gates)[None, :, None]
    columns = []
    for name, cols in zip(adapter.names, adapter.param_slices, strict=True):
        width = widths[name]
        within = torch.arange(width)[None, None, :]
        columns.append(cols.start + (gate * hidden + unit % hidden) * width + within)
    index = (unit * adapter.num_params + torch.cat(columns, dim=2)).reshape(-1)
    index = index.to(device)
    _immediate_index[adapter] = index
    return index


_COMPACT_NAMES = (
    ["weight_ih", "weight_hh", "bias_ih", "bias_hh"],
    ["weight_ih", "weight_hh"],
)


def _compact_layout(adapter: CellAdapter) -> bool:
    return adapter.names in _COMPACT_NAMES and adapter.hidden_weight_mask() is None


# Backend choice ---------------------------------------------------------------


def get_backend() -> str:
    """The requested backend of `propagate_sparse` (one of `BACKENDS`)."""
    if _backend is not None:
        return _backend
    return _check_backend(os.environ.get(ENVIRONMENT_VARIABLE, "auto"), "environment")


def set_backend(name: str) -> None:
    """Request a backend of `propagate_sparse` for the whole process."""
    global _backend
    _backend = _check_backend(name, "argument")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend, then restore the previous request."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def available_backends(influence: torch.Tensor) -> list[str]:
    """The concrete backends that can run on tensors like `influence`."""
    names = ["torch", "dense", "reference"]
    if _numba_fits(influence):
        names.insert(0, "numba")
    return names


def resolve_backend(influence: torch.Tensor, paths: int) -> str:
    """The concrete backend `propagate_sparse` runs for these tensors and K."""
    requested = get_backend()
    if requested == "auto":
        if paths >= DENSE_MIN_FRACTION * influence.shape[1]:
            return "dense"
        return "numba" if _numba_fits(influence) else "torch"
    if requested == "numba" and not _numba_fits(influence):
        reason = (
            "numba is not installed (pip install 'sparse-rtrl[fast]')"
            if not numba_available()
            else f"it runs on CPU float32/float64 only, got {influence.device} "
            f"{influence.dtype}"
        )
        raise NotImplementedError(
            f"kernels: the 'numba' backend cannot run here: {reason}; use "
            "set_backend('auto') to fall back to the torch path."
        )
    return requested


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        where = (
            f"the environment variable {ENVIRONMENT_VARIABLE}"
            if source == "environment"
            else "`name`"
        )
        raise ValueError(
            f"kernels: {where} must be one of {', '.join(BACKENDS)}, got {name!r}."
        )
    return name


def _numba_fits(influence: torch.Tensor) -> bool:
    # Either storage order: the learner hands the kernel a row-major one.
    return (
        influence.device.type == "cpu"
        and influence.dtype in (torch.float32, torch.float64)
        and (influence.is_contiguous() or column_major(influence))
        and numba_available()
    )


def _propagate_sparse_dense(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """`propagate_sparse` as one batched matmul with the scattered weights."""
    batch, size, _ = influence.shape
    matrix = path_weight.new_zeros(batch, size, size)
    matrix.scatter_add_(2, path_index, path_weight)  # repeated paths add up
    return propagate_exact(matrix, influence, out)


# The pure-torch tiled update ---------------------------------------------------


def _propagate_sparse_tiled(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """`propagate_sparse` one column tile at a time: gather, scale, sum over K.

    The K gathered rows of a tile (B S K x width) stay small enough to live in
    cache between the gather and the sum, so the influence is read about once.
    """
    batch, size, num_params = influence.shape
    paths = path_index.shape[2]
    rows = influence.view(batch * size, num_params)
    flat_out = out.view(batch * size, num_params)
    offset = torch.arange(batch, device=influence.device).mul_(size).view(batch, 1, 1)
    source = (path_index + offset).reshape(-1)
    weight = path_weight.reshape(batch * size, paths, 1)

    budget = CUDA_GATHER_BYTES if influence.is_cuda else GATHER_BYTES
    width = max(256, budget // (source.numel() * influence.element_size()))
    width = min(width, num_params)
    scratch = influence.new_empty(source.numel() * width)
    for start in range(0, num_params, width):
        stop = min(start + width, num_params)
        gathered = scratch[: source.numel() * (stop - start)].view(-1, stop - start)
        torch.index_select(rows[:, start:stop], 0, source, out=gathered)
        gathered = gathered.view(batch * size, paths, stop - start).mul_(weight)
        torch.sum(gathered, dim=1, out=flat_out[:, start:stop])
    return out
