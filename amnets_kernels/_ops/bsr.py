"""bsr_linear(x, weight: BlockSparseMatrix, bias=None) = x @ weight.to_dense().T + bias."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _validate
from ..formats import BlockSparseMatrix
from ..reference import acc_dtype, lstm_pointwise
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


def _reads_indices(x: Tensor) -> bool:
    """Whether the Python check must read the index data: not for the cpu face, whose kernels check the
    pattern themselves on every call (csrc/checks.h), so that it is read once per call, not twice."""
    return _backend.which_face(OP, x.device) != "cpu"


def _forward(x, values, crow_indices, col_indices, out_features, in_features, bias):
    """Checked face call for x (..., in_features): the forward op's body, and bsr_linear's whole path
    for eager inference (one validation, then the face)."""
    _validate.bsr_linear(OP, x, values, crow_indices, col_indices, out_features, in_features, bias,
                         data=_reads_indices(x))
    return _face_forward(x, values, crow_indices, col_indices, out_features, in_features, bias)


def _face_forward(x, values, crow_indices, col_indices, out_features, in_features, bias):
    """The face call on checked arguments, x (..., in_features)."""
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
    _check_backward(grad_out, x, values, crow_indices, col_indices, out_features, in_features,
                    data=_reads_indices(x))
    _say_if_slow(x, values)
    return run(OP, "backward", grad_out, x, values, crow_indices, col_indices, out_features, in_features,
               need_x, need_values)


def _check_backward(grad_out, x, values, crow_indices, col_indices, out_features, in_features, data=False):
    """The real op reads the index data (_reads_indices): it may be called directly
    (torch.ops.amnets.bsr_linear_backward), not only by autograd with the forward's checked tensors."""
    op = "bsr_linear_backward"
    _check_rows(op, x)
    _validate.bsr_linear(op, x, values, crow_indices, col_indices, out_features, in_features, None, data=data)
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


class PreparedBsrLinear:
    """bsr_linear with its weight and bias checked once, for many inference calls (a streaming decoder).

    `PreparedBsrLinear(weight, bias)(x)` equals `bsr_linear(x, weight, bias)` bit for bit, on the same
    face. The weight's shapes, dtypes and index data are checked here, once (the index data again
    only if an index tensor is changed in place); a call checks x only and goes straight to the face
    chosen by the backend in force at that call. A call that wants autograd or runs under tracing
    (torch.compile, a dispatch mode) goes through bsr_linear instead: same answer, with gradients.
    The weight's values may change in place between calls (an optimizer step); build a new one for
    a new sparsity pattern or when the matrix's tensors are replaced.
    """

    def __init__(self, weight: BlockSparseMatrix, bias: Optional[Tensor] = None):
        if not isinstance(weight, BlockSparseMatrix):
            raise TypeError(f"PreparedBsrLinear: weight must be an amnets_kernels.BlockSparseMatrix; got "
                            f"{type(weight).__name__}")
        _validate.tensor_types(OP, ("bias",), bias=bias)
        # The tensors the weight holds now: changes made in place are followed, replaced tensors are not.
        self.values, self.crow_indices, self.col_indices = weight.values, weight.crow_indices, weight.col_indices
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self._check_weight()

    def _check_weight(self) -> None:
        probe = self.values.new_empty(0, self.in_features)
        _validate.bsr_linear(OP, probe, self.values, self.crow_indices, self.col_indices, self.out_features,
                             self.in_features, self.bias, data=True)
        self._index_versions = (_validate.version(self.crow_indices), _validate.version(self.col_indices))

    def __call__(self, x: Tensor) -> Tensor:
        _validate.prepared_input(OP, "x", x, self.in_features, self.values)
        args = self.args()
        if not eager_inference(x, self.values, self.bias):
            return torch.ops.amnets.bsr_linear(x, *args)
        return _face_forward(x, *args)

    def args(self) -> tuple:
        """(values, crow_indices, col_indices, out_features, in_features, bias) in the op's order, checked
        for the face about to run them. The cpu face's kernels check shapes and index data themselves on
        every call. Other faces get the whole check again here: on every call for CPU tensors (it cannot
        be fooled by an edit through .data or .numpy(), an inference tensor or values.set_()); for CUDA
        tensors when an index tensor's version changed (reading them is a device sync)."""
        device = self.values.device
        if device.type == "cpu":
            if _reads_indices(self.values):
                self._check_weight()
        elif (_validate.version(self.crow_indices), _validate.version(self.col_indices)) != self._index_versions \
                or self.values.shape[0] != self.col_indices.numel():
            self._check_weight()
        return (self.values, self.crow_indices, self.col_indices, self.out_features, self.in_features, self.bias)


class PreparedBsrLstmCell:
    """One LSTM step whose [W_ih | W_hh] (4H, D + H) is a BlockSparseMatrix, for inference (streaming).

    `PreparedBsrLstmCell(weight, bias)(x, h, c)` -> (h1, c1): gates = [x | h] W^T + bias in nn.LSTM's
    order i, f, g, o, then the LSTM update. The weight is checked once, as PreparedBsrLinear does.
    When bsr_linear's face in force is "cpu" and the weight has its fast kernels (block 16/32/64, fp32 or
    bf16), the whole step is ONE native call (gates by the bsr kernels, activations fused after them);
    otherwise it is bsr_linear's face for the gates plus the PyTorch pointwise update, and a warning says
    so once per device. `last_path` tells which ran ("fused" or "bsr_linear + pointwise"). A call that
    wants autograd or runs under tracing takes the second path through bsr_linear: same answer, with
    gradients.
    """

    def __init__(self, weight: BlockSparseMatrix, bias: Optional[Tensor] = None):
        self.linear = PreparedBsrLinear(weight, bias)
        n, k = weight.shape
        if n % 4 or k <= n // 4:
            raise ValueError(f"PreparedBsrLstmCell: weight must be [W_ih | W_hh] of shape (4*H, D + H) with "
                             f"D >= 1; got {tuple(weight.shape)}")
        self.hidden_size, self.input_size = n // 4, k - n // 4
        values = self.linear.values
        self._fast = values.shape[1] in _FAST["cpu"][0] and values.dtype in _FAST["cpu"][1]
        self.last_path: str | None = None

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        values, bias = self.linear.values, self.linear.bias
        _validate.prepared_step("PreparedBsrLstmCell", x, h, c, self.input_size, self.hidden_size, values)
        fusable = self._fast and _backend.resolve(OP, x.device).name == "cpu"
        if fusable and eager_inference(x, h, c, values, bias):
            self.last_path = "fused"  # the kernel checks the weight's shapes and pattern itself, every call
            return _fused_cell(x, h, c, values, self.linear.crow_indices, self.linear.col_indices, bias)
        if not fusable and (x.device.type, self._fast) not in _unfused_warned:
            _unfused_warned.add((x.device.type, self._fast))
            warnings.warn(f"PreparedBsrLstmCell on {x.device.type}: no fused step kernel for this face or weight "
                          "(the fused step is the cpu face's, block 16/32/64, fp32/bf16); runs bsr_linear for "
                          "the gates and the PyTorch LSTM update.", stacklevel=2)
        self.last_path = "bsr_linear + pointwise"
        return lstm_pointwise(self.linear(torch.cat([x, h], dim=1)), c)


_unfused_warned: set = set()
_fused_cell = torch.ops.amnets_native.bsr_lstm_cell_forward.default if _backend.EXTENSION_ERROR is None else None
