"""bsr_linear(x, weight: BlockSparseMatrix, bias=None) = x @ weight.to_dense().T + bias."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _validate
from ..formats import BlockSparseMatrix
from .lstm_update import lstm_pointwise
from . import eager_inference, functorch, python_face

OP = "bsr_linear"

# The op lives in C++ (csrc/bsr.cpp): torch.ops.amnets.bsr_linear, bsr_linear_forward (autograd) and
# bsr_linear_backward check their arguments once and run the compiled kernel of the tensors' device, or
# the Python face registered below when the backend asks for the reference or Triton face.
_op, _forward_op = torch.ops.amnets.bsr_linear.default, torch.ops.amnets.bsr_linear_forward.default


def bsr_linear(x: Tensor, weight: BlockSparseMatrix, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T + bias for x (..., in_features) and a block-sparse W (out_features, in_features).

    Differentiable in x, weight.values (the stored blocks only) and bias.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(f"{OP}: weight must be an amnets_kernels.BlockSparseMatrix; got "
                        f"{type(weight).__name__} (build one with BlockSparseMatrix.from_dense)")
    return _call(x, weight.values, weight.crow_indices, weight.col_indices, weight.shape[0], weight.shape[1], bias)


def _call(x, values, crow_indices, col_indices, out_features, in_features, bias):
    """The op on x (..., in_features); 2-D x skips the reshaping layer."""
    if values.dtype not in _FAST_DTYPES or values.shape[-1] not in _FAST_BLOCKS:  # (inline: ~0.2 us a call less)
        say_if_slow(x, values)
    try:
        if functorch.active():
            return functorch.bsr_linear(x, values, crow_indices, col_indices, out_features, in_features, bias)
        if type(x) is Tensor and x.dim() == 2:
            return _forward_op(x, values, crow_indices, col_indices, out_features, in_features, bias)
        return _op(x, values, crow_indices, col_indices, out_features, in_features, bias)
    except RuntimeError:  # torch.ops' own answer to a non-tensor argument: say it as the other checks do
        _validate.tensor_types(OP, ("bias",), x=x, bias=bias)
        raise


# The compiled faces' fast kernels; other block sizes and dtypes run exact generic code. The warning is
# raised here rather than by TORCH_WARN in C++: a TORCH_WARN_ONCE from the extension crashed the process
# under torch 2.11 on the H200 machine (benchmarks/results/nvidia-h200-gpu-suite-run1.log).
_FAST = {"cpu": ({16, 32, 64}, {torch.float32, torch.bfloat16}, "no SIMD kernel",
                 "computing with dense math on the densified blocks"),
         "cuda": ({16, 32, 64}, {torch.float32, torch.float16, torch.bfloat16}, "no fast kernel",
                  "a generic kernel (one thread per output) computes it")}
# What every face has a fast kernel for: a call inside both sets needs no closer look at its face (the union
# let fp16 on the cpu face, which has no fp16 kernel, pass unannounced).
_FAST_BLOCKS = set.intersection(*(f[0] for f in _FAST.values()))
_FAST_DTYPES = set.intersection(*(f[1] for f in _FAST.values()))
_warned: set = set()


def say_if_slow(x, values) -> None:
    """Once per (face, block size, dtype): a compiled face without a fast kernel for this call says so. Every
    eager entry to bsr_linear calls it (the function, PreparedBsrLinear, BlockSparseLinear) where the block size
    or dtype lacks a fast kernel on some face (_FAST_BLOCKS, _FAST_DTYPES: checked at the call, inline)."""
    if not isinstance(values, Tensor) or values.dim() != 3 or not isinstance(x, Tensor) or \
            torch.compiler.is_compiling():
        return  # the op's checks answer; Dynamo cannot trace the C++ backend state read below (eager calls say it)
    key = (values.shape[1], values.dtype)
    slow = no_fast_kernel(x.device, *key)
    if slow is None or slow[0] not in _FAST or (slow[0], *key) in _warned:
        return  # (the Triton face raises for a block size it cannot run)
    _warned.add((slow[0], *key))
    warnings.warn(f"amnets bsr_linear {slow[0]} face: {slow[1]}; {_FAST[slow[0]][3]}: exact, not fast.",
                  stacklevel=4)


def no_fast_kernel(device, block_size: int, dtype: torch.dtype) -> tuple[str, str] | None:
    """(face, why) where the face that runs bsr_linear on `device` now has no fast kernel for this block size
    and dtype (its exact generic path is slower than a dense layer), else None: the warning above and
    swap_in's only_if_cheaper both ask it."""
    try:
        face = _backend.which_face(OP, device)
    except _backend.FaceUnavailableError:
        return None  # (the op raises it, or runs where no face is chosen: meta tensors)
    if face == "triton":  # no generic path: the op refuses a block size it has no kernel for
        from ..triton.bsr import BLOCK_SIZES  # (importable: which_face chose it)
        if block_size in BLOCK_SIZES:
            return None
        return face, f"no kernel for block size {block_size} (it runs {', '.join(map(str, BLOCK_SIZES))})"
    if face not in _FAST:
        return None
    blocks, dtypes, what, _ = _FAST[face]
    slow = [s for s, fast in ((f"block size {block_size}", block_size in blocks),
                              (f"dtype {dtype}", dtype in dtypes)) if not fast]
    if not slow:
        return None
    fast = f"block sizes {', '.join(map(str, sorted(blocks)))}; dtypes {', '.join(sorted(map(str, dtypes)))}"
    return face, f"{what} for {' and '.join(slow)} (fast: {fast})"


def _check_rows(op: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (M, in_features); got shape {tuple(x.shape)} "
                         "(torch.ops.amnets.bsr_linear takes any leading dims)")


python_face(OP, "forward", torch.ops.amnets.bsr_linear_forward.default)
python_face(OP, "backward", torch.ops.amnets.bsr_linear_backward.default)


@torch.library.register_fake("amnets::bsr_linear_forward")
def _(x, values, crow_indices, col_indices, out_features, in_features, bias):
    _check_rows(OP, x)
    _validate.bsr_linear(OP, x, values, crow_indices, col_indices, out_features, in_features, bias, data=False)
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("amnets::bsr_linear_backward")
def _(grad_out, x, values, crow_indices, col_indices, out_features, in_features, need_x, need_values):
    op = "bsr_linear_backward"
    _check_rows(op, x)
    _validate.bsr_linear(op, x, values, crow_indices, col_indices, out_features, in_features, None, data=False)
    _validate.grads_and_saved(op, {"grad_out": (grad_out, (x.shape[0], out_features))})
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            values.new_empty(values.shape) if need_values else values.new_empty(0))


class PreparedBsrLinear:
    """bsr_linear for many inference calls (a streaming decoder), its weight and bias checked once up front.

    `PreparedBsrLinear(weight, bias)(x)` equals `bsr_linear(x, weight, bias)` bit for bit: it is that call
    on the tensors the weight holds now, after the weight was checked here (a clear error at
    preparation) and x is checked against it (a message naming the prepared weights). The op checks
    every argument again on each call (csrc/checks.h; the index data by the cpu kernel, or once per
    pattern version for CUDA tensors). The weight's values may change in place between calls (an
    optimizer step); build a new one for a new sparsity pattern or when the matrix's tensors are replaced.
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
        if self.bias is not None and isinstance(self.values, Tensor) and self.bias.dtype != self.values.dtype:
            # (the op's own message names x, here a probe in the values' dtype the caller never made)
            raise TypeError(f"{OP}: the prepared weight's bias has dtype {self.bias.dtype} but its values "
                            f"{self.values.dtype}; they must match")
        probe = self.values.new_empty(0, self.in_features)
        _validate.bsr_linear(OP, probe, self.values, self.crow_indices, self.col_indices, self.out_features,
                             self.in_features, self.bias, data=_validate.index_data_readable(self.values))

    def __call__(self, x: Tensor) -> Tensor:
        _validate.prepared_input(OP, "x", x, self.in_features, self.values)
        return _call(x, *self.args())

    def args(self) -> tuple:
        """(values, crow_indices, col_indices, out_features, in_features, bias) in the op's order. The op
        checks them again on every call (cheaply: shapes in C++, the index data by the cpu kernel or,
        for CUDA tensors, once per pattern version)."""
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
        self.last_path: str | None = None

    @property
    def _fast(self) -> bool:
        # Read each call, not at preparation: `values.data` may be switched to another dtype (fp64, fp16) since.
        values = self.linear.values
        return values.shape[1] in _FAST["cpu"][0] and values.dtype in _FAST["cpu"][1]

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        values, bias = self.linear.values, self.linear.bias
        _validate.prepared_step("PreparedBsrLstmCell", x, h, c, self.input_size, self.hidden_size, values)
        fast = self._fast
        # eager_inference first: under torch.compile the face is not resolved here (the public op resolves it)
        eager = eager_inference(x, h, c, values, bias)
        fusable = fast and (not eager or _backend.resolve(OP, x.device).name == "cpu")
        if fusable and eager:
            self.last_path = "fused"  # the kernel checks the weight's shapes and pattern itself, every call
            return _fused_cell(x, h, c, values, self.linear.crow_indices, self.linear.col_indices, bias)
        if not fusable and (x.device.type, fast) not in _unfused_warned:
            _unfused_warned.add((x.device.type, fast))
            warnings.warn(f"PreparedBsrLstmCell on {x.device.type}: no fused step kernel for this face or weight "
                          "(the fused step is the cpu face's, block 16/32/64, fp32/bf16); runs bsr_linear for "
                          "the gates and the PyTorch LSTM update.", stacklevel=2)
        self.last_path = "bsr_linear + pointwise"
        return lstm_pointwise(self.linear(torch.cat([x, h], dim=1)), c)


_unfused_warned: set = set()
_fused_cell = torch.ops.amnets_native.bsr_lstm_cell_forward.default
