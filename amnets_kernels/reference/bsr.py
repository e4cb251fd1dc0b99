"""Reference face of bsr_linear: densify the blocks, then one matmul."""

import torch
from torch import Tensor

from ..formats import block_grid, block_row_of, bsr_to_dense
from . import acc_dtype


def bsr_linear_forward(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                       out_features: int, in_features: int, bias: Tensor | None) -> Tensor:
    acc = acc_dtype(x.dtype)
    weight = bsr_to_dense(values.to(acc), crow_indices, col_indices, (out_features, in_features))
    y = x.to(acc) @ weight.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def bsr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor,
                        col_indices: Tensor, out_features: int, in_features: int, need_x: bool,
                        need_values: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    g = grad_out.to(acc)
    grad_x, grad_values = x.new_empty(0), values.new_empty(0)
    if need_x:
        weight = bsr_to_dense(values.to(acc), crow_indices, col_indices, (out_features, in_features))
        grad_x = (g @ weight).to(x.dtype)
    if need_values:
        # dL/dW = g^T x, read only at the stored blocks: block i is g[:, rows of i]^T x[:, cols of i].
        b = values.shape[-1]
        rows, cols = block_grid((out_features, in_features), b)
        m = x.shape[0]
        g_blocks = torch.nn.functional.pad(g, (0, rows * b - out_features)).view(m, rows, b)
        x_blocks = torch.nn.functional.pad(x.to(acc), (0, cols * b - in_features)).view(m, cols, b)
        grad_values = torch.einsum("mki,mkj->kij", g_blocks[:, block_row_of(crow_indices)],
                                   x_blocks[:, col_indices.to(torch.int64)]).to(values.dtype)
    return grad_x, grad_values
