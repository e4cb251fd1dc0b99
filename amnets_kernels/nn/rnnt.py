"""RNNTLoss (torchaudio's module contract) and FusedJointRNNTLoss (joint output layer + loss in one op)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate
from .._ops.rnnt import fused_joint_rnnt_loss, rnnt_loss


class RNNTLoss(nn.Module):
    """torchaudio.transforms.RNNTLoss's contract: forward(logits, targets, logit_lengths, target_lengths)."""

    def __init__(self, blank: int = -1, clamp: float = -1.0, reduction: str = "mean", fused_log_softmax: bool = True,
                 zero_infinity: bool = False):
        super().__init__()
        _validate.loss_module("RNNTLoss", blank, clamp, reduction, fused_log_softmax=fused_log_softmax,
                              zero_infinity=zero_infinity)
        self.blank, self.clamp, self.reduction, self.fused_log_softmax = blank, clamp, reduction, fused_log_softmax
        self.zero_infinity = zero_infinity

    def forward(self, logits, targets, logit_lengths, target_lengths):
        if torch.jit.is_scripting():  # TorchScript (torchaudio's module scripts): the op itself, which checks all
            return torch.ops.amnets.rnnt_loss(logits, targets, logit_lengths, target_lengths, self.blank, self.clamp,
                                              self.reduction, self.fused_log_softmax, self.zero_infinity)
        return rnnt_loss(logits, targets, logit_lengths, target_lengths, self.blank, self.clamp, self.reduction,
                         self.fused_log_softmax, self.zero_infinity)

    def extra_repr(self) -> str:
        return (f"blank={self.blank}, clamp={self.clamp}, reduction={self.reduction!r}, "
                f"fused_log_softmax={self.fused_log_softmax}, zero_infinity={self.zero_infinity}")


class FusedJointRNNTLoss(nn.Module):
    """The joint network's output layer and the RNN-T loss in one op that never builds the 4-D logits.

    logits(t, u) = act(enc[:, t] + pred[:, u]) @ weight.T + bias, weight (vocab_size, hidden_size).
    forward(enc (B, T, H), pred (B, U+1, H), targets, logit_lengths, target_lengths) -> loss.
    `logits(enc, pred)` materialises them (for decoding a few frames, or checking).
    """

    def __init__(self, hidden_size: int, vocab_size: int, blank: int = -1, activation: str = "tanh",
                 clamp: float = -1.0, reduction: str = "mean", bias: bool = True, device=None, dtype=None,
                 zero_infinity: bool = False):
        super().__init__()
        op = "FusedJointRNNTLoss"
        _validate._int(op, "hidden_size", hidden_size, 1)
        _validate._int(op, "vocab_size", vocab_size, 1)
        _validate.loss_module(op, blank, clamp, reduction, activation, vocab_size, bias=bias,
                              zero_infinity=zero_infinity)
        bound = 1 / math.sqrt(hidden_size)
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(vocab_size, device=device, dtype=dtype).uniform_(-bound, bound)) \
            if bias else None
        self.blank, self.activation, self.clamp, self.reduction = blank, activation, clamp, reduction
        self.zero_infinity = zero_infinity

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> FusedJointRNNTLoss:
        """Adopt an existing joint output layer (its weight and bias are shared, not copied)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def logits(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        hidden = enc[:, :, None] + pred[:, None]
        hidden = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda a: a}[self.activation](hidden)
        return nn.functional.linear(hidden, self.weight, self.bias)

    def forward(self, enc, pred, targets, logit_lengths, target_lengths):
        if torch.jit.is_scripting():  # TorchScript: the op itself, as RNNTLoss
            return torch.ops.amnets.fused_joint_rnnt_loss(enc, pred, self.weight, self.bias, targets, logit_lengths,
                                                          target_lengths, self.blank, self.activation, self.clamp,
                                                          self.reduction, self.zero_infinity)
        return fused_joint_rnnt_loss(enc, pred, self.weight, self.bias, targets, logit_lengths, target_lengths,
                                     self.blank, self.activation, self.clamp, self.reduction, self.zero_infinity)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.weight.shape[1]}, vocab_size={self.weight.shape[0]}, blank={self.blank}, "
                f"activation={self.activation!r}, clamp={self.clamp}, reduction={self.reduction!r}, "
                f"bias={self.bias is not None}, zero_infinity={self.zero_infinity}")
