"""Reference face of bsr_linear: every stored block times its slice of the other operand (a gather, one
einsum, a sum into the output's blocks), in the accumulation dtype.

Absent blocks are a sparse matrix's structural zeros: they never multiply, so a NaN or inf in x reaches only
the outputs whose block row stores a block over its column, as in the compiled faces (a dense matmul on the
densified weight would spread it to every output as 0 * NaN). Block entries past out_features/in_features
(padding, which may hold anything) are zeroed first.
"""

import torch
from torch import Tensor

from ..formats import block_grid, block_row_of
from . import acc_dtype

_GATHER_ELEMENTS = 1 << 24  # rows of the operand per einsum: the gathered (rows, nnzb, b) stays <= 64 MB in fp32


def _blocks(t: Tensor, n_blocks: int, b: int) -> Tensor:
    """(m, n_blocks, b): t's columns zero-padded to whole blocks."""
    return torch.nn.functional.pad(t, (0, n_blocks * b - t.shape[1])).view(t.shape[0], n_blocks, b)


def _logical(values: Tensor, rows: Tensor, cols: Tensor, out_features: int, in_features: int) -> Tensor:
    """values with the entries past out_features / in_features set to 0."""
    b = values.shape[-1]
    offsets = torch.arange(b, device=values.device)
    inside_rows = rows[:, None] * b + offsets < out_features
    inside_cols = cols[:, None] * b + offsets < in_features
    return values.masked_fill(~(inside_rows[:, :, None] & inside_cols[:, None, :]), 0)


def _through_blocks(a: Tensor, gather: Tensor, blocks: Tensor, scatter: Tensor, n_out: int, width: int) -> Tensor:
    """out[:, scatter[k]] += a[:, gather[k]] @ blocks[k] for every stored block k: (m, n_out * b)[:, :width]."""
    m, b = a.shape[0], blocks.shape[-1]
    step = max(1, _GATHER_ELEMENTS // max(1, gather.numel() * b))
    parts = [a.new_zeros(rows.shape[0], n_out, b).index_add(1, scatter, torch.einsum("mki,kij->mkj", rows, blocks))
             for rows in (a[i:i + step, gather] for i in range(0, m, step))]
    out = torch.cat(parts) if parts else a.new_zeros(0, n_out, b)
    return out.reshape(m, n_out * b)[:, :width]


def bsr_linear_forward(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                       out_features: int, in_features: int, bias: Tensor | None) -> Tensor:
    acc = acc_dtype(x.dtype)
    b = values.shape[-1]
    n_rows, n_cols = block_grid((out_features, in_features), b)
    rows, cols = block_row_of(crow_indices), col_indices.to(torch.int64)
    blocks = _logical(values.to(acc), rows, cols, out_features, in_features)
    y = _through_blocks(_blocks(x.to(acc), n_cols, b), cols, blocks.transpose(1, 2), rows, n_rows, out_features)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def bsr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor,
                        col_indices: Tensor, out_features: int, in_features: int, need_x: bool,
                        need_values: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    b = values.shape[-1]
    n_rows, n_cols = block_grid((out_features, in_features), b)
    rows, cols = block_row_of(crow_indices), col_indices.to(torch.int64)
    g_blocks = _blocks(grad_out.to(acc), n_rows, b)
    grad_x, grad_values = x.new_empty(0), values.new_empty(0)
    if need_x:  # g W: block k takes g's slice of its block row to its block column
        blocks = _logical(values.to(acc), rows, cols, out_features, in_features)
        grad_x = _through_blocks(g_blocks, rows, blocks, cols, n_cols, in_features).to(x.dtype)
    if need_values:
        # dL/dW = g^T x, read only at the stored blocks: block k is g[:, rows of k]^T x[:, cols of k].
        x_blocks = _blocks(x.to(acc), n_cols, b)
        grad_values = torch.einsum("mki,mkj->kij", g_blocks[:, rows], x_blocks[:, cols]).to(values.dtype)
    return grad_x, grad_values
