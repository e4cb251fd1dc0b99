"""rnnt_loss (torchaudio.functional.rnnt_loss semantics) and fused_joint_rnnt_loss.

The forward ops return per-sequence costs and, with save=True, the lattice workspace backward needs:
alphas, betas, den (B, T, U+1) in the accumulation dtype. Backward makes one more pass over the logits
(or, fused, recomputes the joint) instead of keeping a (B, T, U+1, V) gradient from the forward.
`clamp` > 0 bounds each sequence's logit gradient to [-clamp, clamp] before it is scaled by the
incoming gradient (as torchaudio does); a non-finite cost gives that sequence a zero gradient and a
warning. Targets and lengths may be int32 or int64; faces receive int32.
"""

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from .._dtypes import acc_dtype
from . import FACES_LIBRARY, functorch, python_face


def _report_non_finite(op: str, costs: Tensor, betas: Tensor) -> None:
    """Warn about non-finite costs, saying truthfully what backward will do with each. With the lattice
    saved (save=True), log P = beta(0, 0) in the accumulation dtype tells a cost that only overflows a
    low-precision costs dtype (fp16 above 65504: backward still computes its gradient) from one that is
    non-finite (no finite path, or a non-finite logit: backward gives it a zero gradient)."""
    finite = torch.isfinite(costs)
    if bool(finite.all()):
        return
    which = (~finite).nonzero().flatten().tolist()
    overflow = []
    if betas.numel():
        log_p_finite = torch.isfinite(betas[:, 0, 0]).tolist()
        overflow = [b for b in which if log_p_finite[b]]
        which = [b for b in which if not log_p_finite[b]]
    if which:
        grad = "; their gradient is zero" if betas.numel() else ""
        widest = costs.dtype in (torch.float32, torch.float64)
        why = "no path with finite probability, or a non-finite logit" + \
            ("" if widest or betas.numel() else f", or a cost beyond {costs.dtype}'s range")
        warnings.warn(f"{op}: sequences {which} have a non-finite cost ({why}){grad}", RuntimeWarning,
                      stacklevel=3)
    if overflow:
        warnings.warn(f"{op}: the costs of sequences {overflow} overflow {costs.dtype} (they are finite in "
                      f"{betas.dtype}); their gradient is computed from the {betas.dtype} lattice as usual, "
                      "unless zero_infinity=True drops them from the loss (as any infinite cost)",
                      RuntimeWarning, stacklevel=3)


# The C++ ops call this when a cost is not finite (csrc/rnnt.cpp): the warning stays a RuntimeWarning.
FACES_LIBRARY.define("report_non_finite(str op, Tensor costs, Tensor betas) -> ()")
FACES_LIBRARY.impl("report_non_finite", _report_non_finite, "CompositeExplicitAutograd")


def _workspace(batch, frames, labels_plus_1, dtype, device, save):
    shape = (batch, frames, labels_plus_1) if save else (0,)
    return tuple(torch.empty(shape, dtype=acc_dtype(dtype), device=device) for _ in range(3))


# ---------------------------------------------------------------------------------------------------
# rnnt_loss

RNNT = "rnnt_loss"


def rnnt_loss(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int = -1,
              clamp: float = -1.0, reduction: str = "mean", fused_log_softmax: bool = True,
              zero_infinity: bool = False) -> Tensor:
    """RNN-T loss of logits (B, T, U+1, V); same arguments and results as torchaudio's rnnt_loss.

    targets (B, U), logit_lengths and target_lengths (B,), int32 or int64; blank in [-V, V).
    Unlike torchaudio, the padded T and U may exceed the longest lengths. zero_infinity (as ctc_loss):
    a sequence whose cost is not finite counts 0 in the result (its gradient is zero either way), so one
    bad utterance does not make a batch's loss NaN.
    """
    if blank.__class__ is bool or fused_log_softmax.__class__ is not bool or zero_infinity.__class__ is not bool:
        # torch.ops takes True as blank 1 and 1 as a flag: Python's types, which only this function sees
        _validate.scalars(RNNT, blank=blank, fused_log_softmax=fused_log_softmax, zero_infinity=zero_infinity)
    try:
        if functorch.active():
            return functorch.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction,
                                       fused_log_softmax, zero_infinity)
        return _rnnt_op(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
                        zero_infinity)
    except RuntimeError:  # torch.ops' own answer to an argument of the wrong type: say it as the other checks do
        _validate.tensor_types(RNNT, logits=logits, targets=targets, logit_lengths=logit_lengths,
                               target_lengths=target_lengths)
        _validate.scalars(RNNT, blank=blank, clamp=clamp, reduction=reduction, fused_log_softmax=fused_log_softmax,
                          zero_infinity=zero_infinity)
        raise


_rnnt_op = torch.ops.amnets.rnnt_loss.default


python_face(RNNT, "forward", torch.ops.amnets.rnnt_loss_forward.default)
python_face(RNNT, "backward", torch.ops.amnets.rnnt_loss_backward.default)


@torch.library.register_fake("amnets::rnnt_loss_forward")
def _(logits, targets, logit_lengths, target_lengths, blank, clamp, fused_log_softmax, save):
    _validate.rnnt_loss(RNNT, logits, targets, logit_lengths, target_lengths, blank, clamp, "none", data=False)
    batch, frames, labels_plus_1, _ = logits.shape
    return (logits.new_empty(batch), *_workspace(batch, frames, labels_plus_1, logits.dtype, logits.device, save))


def _check_saved(op, batch, frames, labels_plus_1, grad_costs, costs, alphas, betas, den):
    lattice = (batch, frames, labels_plus_1)
    _validate.grads_and_saved(op, {"grad_costs": (grad_costs, (batch,)), "costs": (costs, (batch,)),
                                   "alphas": (alphas, lattice), "betas": (betas, lattice),
                                   "den": (den, lattice)})


@torch.library.register_fake("amnets::rnnt_loss_backward")
def _(grad_costs, logits, targets, logit_lengths, target_lengths, costs, alphas, betas, den, blank, clamp,
      fused_log_softmax):
    op = RNNT + "_backward"
    _validate.rnnt_loss(op, logits, targets, logit_lengths, target_lengths, blank, clamp, "none", data=False)
    _check_saved(op, *logits.shape[:3], grad_costs, costs, alphas, betas, den)
    return logits.new_empty(logits.shape)


# ---------------------------------------------------------------------------------------------------
# fused_joint_rnnt_loss

JOINT = "fused_joint_rnnt_loss"


def fused_joint_rnnt_loss(enc: Tensor, pred: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          logit_lengths: Tensor, target_lengths: Tensor, blank: int = -1,
                          activation: str = "tanh", clamp: float = -1.0, reduction: str = "mean",
                          zero_infinity: bool = False) -> Tensor:
    """rnnt_loss(act(enc[:, :, None] + pred[:, None]) @ weight.T + bias, ...) without the 4-D logits.

    enc (B, T, H), pred (B, U+1, H), weight (V, H), bias (V,) or None; activation "tanh", "relu" or
    "identity". Differentiable in enc, pred, weight and bias. Peak memory is O(B*T*U) plus one tile
    of cells (cpu: ~256 cells; cuda and triton: a chunk of at most 256 MiB / 64 MiB of logits); the
    reference face materialises the logits. zero_infinity: as rnnt_loss's.
    """
    if blank.__class__ is bool or zero_infinity.__class__ is not bool:  # as rnnt_loss's
        _validate.scalars(JOINT, blank=blank, zero_infinity=zero_infinity)
    try:
        if functorch.active():
            return functorch.fused_joint_rnnt_loss(enc, pred, weight, bias, targets, logit_lengths, target_lengths,
                                                   blank, activation, clamp, reduction, zero_infinity)
        return _joint_op(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank, activation, clamp,
                         reduction, zero_infinity)
    except RuntimeError:
        _validate.tensor_types(JOINT, ("bias",), enc=enc, pred=pred, weight=weight, bias=bias, targets=targets,
                               logit_lengths=logit_lengths, target_lengths=target_lengths)
        _validate.scalars(JOINT, blank=blank, activation=activation, clamp=clamp, reduction=reduction,
                          zero_infinity=zero_infinity)
        raise


_joint_op = torch.ops.amnets.fused_joint_rnnt_loss.default


python_face(JOINT, "forward", torch.ops.amnets.fused_joint_rnnt_loss_forward.default)
python_face(JOINT, "backward", torch.ops.amnets.fused_joint_rnnt_loss_backward.default)


@torch.library.register_fake("amnets::fused_joint_rnnt_loss_forward")
def _(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank, activation, clamp, save):
    _validate.fused_joint_rnnt_loss(JOINT, enc, pred, weight, bias, targets, logit_lengths, target_lengths,
                                    blank, activation, clamp, "none", data=False)
    batch, frames, _ = enc.shape
    return (enc.new_empty(batch), *_workspace(batch, frames, pred.shape[1], enc.dtype, enc.device, save))


@torch.library.register_fake("amnets::fused_joint_rnnt_loss_backward")
def _(grad_costs, enc, pred, weight, bias, targets, logit_lengths, target_lengths, costs, alphas, betas, den,
      blank, activation, clamp):
    op = JOINT + "_backward"
    _validate.fused_joint_rnnt_loss(op, enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank,
                                    activation, clamp, "none", data=False)
    _check_saved(op, enc.shape[0], enc.shape[1], pred.shape[1], grad_costs, costs, alphas, betas, den)
    return (enc.new_empty(enc.shape), pred.new_empty(pred.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else enc.new_empty(0))
