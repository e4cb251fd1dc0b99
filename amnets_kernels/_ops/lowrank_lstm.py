"""lowrank_lstm_cell and lowrank_lstm_sequence: an LSTM whose gate matrices are low-rank products.

W_ih = w_ih_u (4H, r) @ w_ih_v (r, D), W_hh = w_hh_u (4H, r_h) @ w_hh_v (r_h, H), one bias (4H,),
gates i, f, g, o in nn.LSTM's order. Gradients flow to every input (full BPTT for the sequence).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from .._dtypes import acc_dtype
from . import functorch, python_face


# ---------------------------------------------------------------------------------------------------
# cell

CELL = "lowrank_lstm_cell"


def lowrank_lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih_u: Tensor, w_ih_v: Tensor, w_hh_u: Tensor,
                      w_hh_v: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One step: x (B, D), h and c (B, H) -> (h1, c1)."""
    try:
        if functorch.active():
            return functorch.lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
        return torch.ops.amnets.lowrank_lstm_cell.default(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    except RuntimeError:  # torch.ops' own answer to a non-tensor argument: say it as the other checks do
        _validate.tensor_types(CELL, ("bias",), x=x, h=h, c=c, w_ih_u=w_ih_u, w_ih_v=w_ih_v, w_hh_u=w_hh_u,
                               w_hh_v=w_hh_v, bias=bias)
        raise


# The ops live in C++ (csrc/lowrank_lstm.cpp); here: the Python faces they call for the reference and
# Triton backends, and the fake kernels for tracing.
python_face(CELL, "forward", torch.ops.amnets.lowrank_lstm_cell_forward.default)
python_face(CELL, "backward", torch.ops.amnets.lowrank_lstm_cell_backward.default)


@torch.library.register_fake("amnets::lowrank_lstm_cell_forward")
def _(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save):
    hidden = _validate.lowrank_lstm(CELL, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=False)
    gates = (x.shape[0], 4 * hidden) if save else (0,)
    return h.new_empty(h.shape), c.new_empty(c.shape), x.new_empty(gates, dtype=acc_dtype(x.dtype))


@torch.library.register_fake("amnets::lowrank_lstm_cell_backward")
def _(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates):
    op = CELL + "_backward"
    hidden = _validate.lowrank_lstm(op, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, None, sequence=False)
    state = tuple(h.shape)
    _validate.grads_and_saved(op, {"grad_h1": (grad_h1, state), "grad_c1": (grad_c1, state),
                                   "c1": (c1, state), "gates": (gates, (x.shape[0], 4 * hidden))})
    return _grads_like(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v)


def _grads_like(*inputs):
    """The fake backward's eight gradients: one per input, then the bias's (4H,)."""
    return (*(t.new_empty(t.shape) for t in inputs), inputs[0].new_empty(inputs[3].shape[0]))


class PreparedLowrankLstmCell:
    """lowrank_lstm_cell for many inference steps (streaming), with its weights' shapes pinned.

    `PreparedLowrankLstmCell(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)(x, h, c)` equals
    `lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)` bit for bit, on the same face: it is
    that call, after checking here, once, that the weights fit together (their values may change in
    place, not their shapes: a resize_ or set_ afterwards is an error) and, per call, that x (B, D), h and
    c (B, H) match them. The op checks every argument again, in C++ (a fraction of a microsecond).
    """

    def __init__(self, w_ih_u: Tensor, w_ih_v: Tensor, w_hh_u: Tensor, w_hh_v: Tensor,
                 bias: Optional[Tensor] = None):
        _validate.tensor_types(CELL, ("bias",), w_ih_u=w_ih_u, w_ih_v=w_ih_v, w_hh_u=w_hh_u, w_hh_v=w_hh_v,
                               bias=bias)
        self.input_size, self.hidden_size = w_ih_v.shape[-1], w_hh_v.shape[-1]
        empty = w_ih_v.new_empty(0, self.input_size), w_hh_v.new_empty(0, self.hidden_size)
        _validate.lowrank_lstm(CELL, empty[0], empty[1], empty[1], w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias,
                               sequence=False)
        self.weights = (w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
        self._layout = _layout(self.weights)

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        if _layout(self.weights) != self._layout:  # resize_ / set_ after preparation: the faces index by shape
            names = ("w_ih_u", "w_ih_v", "w_hh_u", "w_hh_v", "bias")
            name = next(n for n, now, then in zip(names, _layout(self.weights), self._layout) if now != then)
            raise ValueError(f"PreparedLowrankLstmCell: {name} changed shape or dtype after preparation "
                             "(resize_ or set_); prepare the step again")
        _validate.prepared_step("PreparedLowrankLstmCell", x, h, c, self.input_size, self.hidden_size,
                                self.weights[0])
        return lowrank_lstm_cell(x, h, c, *self.weights)


def _layout(tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype) for t in tensors)


# ---------------------------------------------------------------------------------------------------
# sequence

SEQ = "lowrank_lstm_sequence"


def lowrank_lstm_sequence(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih_u: Tensor,
                          w_ih_v: Tensor, w_hh_u: Tensor, w_hh_v: Tensor,
                          bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """All T steps in one op: x (T, B, D), h0/c0 (B, H) or None (zeros) -> (out (T, B, H), h_n, c_n)."""
    try:
        if functorch.active():
            return functorch.lowrank_lstm_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
        return torch.ops.amnets.lowrank_lstm_sequence.default(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    except RuntimeError:
        _validate.tensor_types(SEQ, ("h0", "c0", "bias"), x=x, h0=h0, c0=c0, w_ih_u=w_ih_u, w_ih_v=w_ih_v,
                               w_hh_u=w_hh_u, w_hh_v=w_hh_v, bias=bias)
        raise


python_face(SEQ, "forward", torch.ops.amnets.lowrank_lstm_sequence_forward.default)
python_face(SEQ, "backward", torch.ops.amnets.lowrank_lstm_sequence_backward.default)


@torch.library.register_fake("amnets::lowrank_lstm_sequence_forward")
def _(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save):
    hidden = _validate.lowrank_lstm(SEQ, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=True)
    steps, batch = x.shape[:2]
    acc = acc_dtype(x.dtype)
    gates = x.new_empty((steps, batch, 4 * hidden) if save else (0,), dtype=acc)
    cells = x.new_empty((steps, batch, hidden) if save else (0,), dtype=acc)
    return x.new_empty(steps, batch, hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cells


@torch.library.register_fake("amnets::lowrank_lstm_sequence_backward")
def _(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out, gates, cells):
    op = SEQ + "_backward"
    hidden = _validate.lowrank_lstm(op, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, None, sequence=True)
    steps, batch = x.shape[:2]
    _validate.grads_and_saved(op, {
        "grad_out": (grad_out, (steps, batch, hidden)), "grad_h_n": (grad_h_n, (batch, hidden)),
        "grad_c_n": (grad_c_n, (batch, hidden)), "out": (out, (steps, batch, hidden)),
        "gates": (gates, (steps, batch, 4 * hidden)), "cells": (cells, (steps, batch, hidden))})
    return _grads_like(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v)
