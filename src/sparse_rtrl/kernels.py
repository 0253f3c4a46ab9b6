r"""The influence-update kernels: the hottest path of the library.

Every forward-mode estimator with a dense (B, S, P) influence spends its step
here. Each function writes into a preallocated `out` (double buffering: no
allocation per step) and is the single place a faster implementation plugs in.

- `propagate_exact`: out = J M, a batched matmul, Eq. (1) of `RTRL`.
- `propagate_sparse`: out[b, i] = sum_j w[b, i, j] M[b, idx[b, i, j]], Eq. (1)
  of `SparseRTRL`; this is the reference implementation, a loop over the K
  paths with one row gather each.
- `influence_gradient`: g = sum_b c_b M_b, the (P,) gradient.
"""

import torch


def propagate_exact(
    recurrent_jacobian: torch.Tensor, influence: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = J @ M. Shapes: J (B, S, S), M and out (B, S, P)."""
    return torch.bmm(recurrent_jacobian, influence, out=out)


def propagate_sparse(
    influence: torch.Tensor,
    path_index: torch.Tensor,
    path_weight: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[b, i] = sum_j path_weight[b, i, j] * influence[b, path_index[b, i, j]].

    Shapes: influence and out (B, S, P); path_index (B, S, K) int64;
    path_weight (B, S, K). K = 0 gives zeros.
    """
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
    """g = sum_b credit_b @ influence_b. Shapes: credit (B, S), influence (B, S, P)."""
    batch, size, num_params = influence.shape
    return torch.mm(credit.reshape(1, batch * size), influence.reshape(-1, num_params))[
        0
    ]
