"""bsr_linear(x, weight: BlockSparseMatrix, bias=None) = x @ weight.to_dense().T + bias."""

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _validate
from ..formats import BlockSparseMatrix
from ..reference import acc_dtype
from . import composite, custom_op, eager_inference, register_autograd, run

OP = "bsr_linear"


def bsr_linear(x: Tensor, weight: BlockSparseMatrix, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T + bias for x (..., in_features) and a block-sparse W (out_features, in_features).

    Differentiable in x, weight.values (the stored blocks only) and bias.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(f"{OP}: weight must be an amnets_kernels.BlockSparseMatrix; got "
                        f"{type(weight).__name__} (build one with BlockSparseMatrix.from_dense)")
    _validate.tensor_types(OP, ("bias",), x=x, bias=bias)
    args = (weight.values, weight.crow_indices, weight.col_indices, weight.shape[0], weight.shape[1], bias)
    if eager_inference(x, weight.values, bias):
        return _forward(x, *args)
    return torch.ops.amnets.bsr_linear(x, *args)


@composite("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
           "int out_features, int in_features, Tensor? bias=None) -> Tensor")
def _bsr_linear(x, values, crow_indices, col_indices, out_features, in_features, bias=None):
    _validate.bsr_linear(OP, x, values, crow_indices, col_indices, out_features, in_features, bias, data=False)
    y = torch.ops.amnets.bsr_linear_forward(x.reshape(-1, in_features), values, crow_indices, col_indices,
                                            out_features, in_features, bias)
    return y.view(*x.shape[:-1], out_features)


# The compiled faces' fast kernels; other block sizes and dtypes run exact generic code. The warning is
# raised here rather than by TORCH_WARN in C++: a TORCH_WARN_ONCE from the extension crashed the process
# under torch 2.11 on the H200 machine (benchmarks/results/nvidia-h200-gpu-suite.log).
_FAST = {"cpu": ({16, 32, 64}, {torch.float32, torch.bfloat16}, "no SIMD kernel",
                 "computing with dense math on the densified blocks"),
         "cuda": ({16, 32, 64}, {torch.float32, torch.float16, torch.bfloat16}, "no fast kernel",
                  "a generic kernel (one thread per output) computes it")}
_warned: set = set()


def _say_if_slow(x: Tensor, values: Tensor) -> None:
    """Once per (face, block size, dtype): a compiled face without a fast kernel for this call says so."""
    face = _backend.resolve(OP, x.device).name
    if face not in _FAST or values.dim() != 3:
        return
    blocks, dtypes, what, instead = _FAST[face]
    key = (face, values.shape[1], values.dtype)
    if (values.shape[1] in blocks and values.dtype in dtypes) or key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"amnets bsr_linear {face} face: {what} for block size {values.shape[1]} and dtype {values.dtype} "
                  f"(kernels exist for b in {sorted(blocks)} and {sorted(str(d) for d in dtypes)}); {instead}: "
                  "exact, not fast.", stacklevel=2)


def _check_rows(op: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (M, in_features); got shape {tuple(x.shape)} "
                         "(torch.ops.amnets.bsr_linear takes any leading dims)")


@custom_op("bsr_linear_forward")
def bsr_linear_forward(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                       out_features: int, in_features: int, bias: Optional[Tensor]) -> Tensor:
    _check_rows(OP, x)
    return _forward(x, values, crow_indices, col_indices, out_features, in_features, bias)


def _forward(x, values, crow_indices, col_indices, out_features, in_features, bias):
    """Checked face call for x (..., in_features): the forward op's body, and bsr_linear's whole path
    for eager inference (one validation, then the face)."""
    _validate.bsr_linear(OP, x, values, crow_indices, col_indices, out_features, in_features, bias, data=True)
    _say_if_slow(x, values)
    y = run(OP, "forward", x.reshape(-1, in_features), values, crow_indices, col_indices, out_features,
            in_features, bias)
    return y.view(*x.shape[:-1], out_features)


@bsr_linear_forward.register_fake
def _(x, values, crow_indices, col_indices, out_features, in_features, bias):
    _check_rows(OP, x)
    _validate.bsr_linear(OP, x, values, crow_indices, col_indices, out_features, in_features, bias, data=False)
    return x.new_empty(x.shape[0], out_features)


@custom_op("bsr_linear_backward")
def bsr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor,
                        col_indices: Tensor, out_features: int, in_features: int, need_x: bool,
                        need_values: bool) -> tuple[Tensor, Tensor]:
    _check_backward(grad_out, x, values, crow_indices, col_indices, out_features, in_features)
    _say_if_slow(x, values)
    return run(OP, "backward", grad_out, x, values, crow_indices, col_indices, out_features, in_features,
               need_x, need_values)


def _check_backward(grad_out, x, values, crow_indices, col_indices, out_features, in_features):
    op = "bsr_linear_backward"
    _check_rows(op, x)
    _validate.bsr_linear(op, x, values, crow_indices, col_indices, out_features, in_features, None, data=False)
    _validate.grads_and_saved(op, {"grad_out": (grad_out, (x.shape[0], out_features))})


@bsr_linear_backward.register_fake
def _(grad_out, x, values, crow_indices, col_indices, out_features, in_features, need_x, need_values):
    _check_backward(grad_out, x, values, crow_indices, col_indices, out_features, in_features)
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            values.new_empty(values.shape) if need_values else values.new_empty(0))


def _setup(ctx, inputs, output):
    x, values, crow_indices, col_indices, out_features, in_features, bias = inputs
    ctx.save_for_backward(x, values, crow_indices, col_indices)
    ctx.features = (out_features, in_features)


def _backward(ctx, grad_y):
    x, values, crow_indices, col_indices = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_values = torch.ops.amnets.bsr_linear_backward(
        grad_y, x, values, crow_indices, col_indices, *ctx.features, need_x, need_values)
    grad_bias = grad_y.sum(0, dtype=acc_dtype(grad_y.dtype)).to(grad_y.dtype) if ctx.needs_input_grad[6] else None
    return (grad_x if need_x else None, grad_values if need_values else None, None, None, None, None,
            grad_bias)


register_autograd(bsr_linear_forward, _backward, _setup)
