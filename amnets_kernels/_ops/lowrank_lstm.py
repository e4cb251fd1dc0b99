"""lowrank_lstm_cell and lowrank_lstm_sequence: an LSTM whose gate matrices are low-rank products.

W_ih = w_ih_u (4H, r) @ w_ih_v (r, D), W_hh = w_hh_u (4H, r_h) @ w_hh_v (r_h, H), one bias (4H,),
gates i, f, g, o in nn.LSTM's order. Gradients flow to every input (full BPTT for the sequence).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from ..reference import acc_dtype
from . import composite, custom_op, eager_inference, register_autograd, run, wants_grad


# ---------------------------------------------------------------------------------------------------
# cell

CELL = "lowrank_lstm_cell"


def lowrank_lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih_u: Tensor, w_ih_v: Tensor, w_hh_u: Tensor,
                      w_hh_v: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One step: x (B, D), h and c (B, H) -> (h1, c1)."""
    _validate.tensor_types(CELL, ("bias",), x=x, h=h, c=c, w_ih_u=w_ih_u, w_ih_v=w_ih_v, w_hh_u=w_hh_u,
                           w_hh_v=w_hh_v, bias=bias)
    if eager_inference(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):  # a streaming step: no op layers
        h1, c1, _ = _cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, False)
        return h1, c1
    return torch.ops.amnets.lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)


@composite("lowrank_lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, "
           "Tensor w_hh_v, Tensor? bias=None) -> (Tensor, Tensor)")
def _lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias=None):
    save = wants_grad(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    h1, c1, _ = torch.ops.amnets.lowrank_lstm_cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)
    return h1, c1


@custom_op("lowrank_lstm_cell_forward")
def lowrank_lstm_cell_forward(x: Tensor, h: Tensor, c: Tensor, w_ih_u: Tensor, w_ih_v: Tensor,
                              w_hh_u: Tensor, w_hh_v: Tensor, bias: Optional[Tensor],
                              save: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)


def _cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save):
    """The cell forward op's body; lowrank_lstm_cell calls it directly for eager inference."""
    _validate.lowrank_lstm(CELL, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=False)
    return run(CELL, "forward", x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)


@lowrank_lstm_cell_forward.register_fake
def _(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save):
    hidden = _validate.lowrank_lstm(CELL, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=False)
    gates = (x.shape[0], 4 * hidden) if save else (0,)
    return h.new_empty(h.shape), c.new_empty(c.shape), x.new_empty(gates, dtype=acc_dtype(x.dtype))


@custom_op("lowrank_lstm_cell_backward")
def lowrank_lstm_cell_backward(grad_h1: Tensor, grad_c1: Tensor, x: Tensor, h: Tensor, c: Tensor,
                               w_ih_u: Tensor, w_ih_v: Tensor, w_hh_u: Tensor, w_hh_v: Tensor, c1: Tensor,
                               gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                       Tensor, Tensor]:
    _check_cell_backward(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates)
    return run(CELL, "backward", grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates)


def _check_cell_backward(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates):
    op = CELL + "_backward"
    hidden = _validate.lowrank_lstm(op, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, None, sequence=False)
    state = tuple(h.shape)
    _validate.grads_and_saved(op, {"grad_h1": (grad_h1, state), "grad_c1": (grad_c1, state),
                                   "c1": (c1, state), "gates": (gates, (x.shape[0], 4 * hidden))})


@lowrank_lstm_cell_backward.register_fake
def _(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates):
    _check_cell_backward(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates)
    return (*(t.new_empty(t.shape) for t in (x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v)),
            x.new_empty(w_ih_u.shape[0]))


def _cell_setup(ctx, inputs, output):
    x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save = inputs
    h1, c1, gates = output
    ctx.mark_non_differentiable(gates)
    ctx.save_for_backward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates)


def _cell_backward(ctx, grad_h1, grad_c1, _grad_gates):
    grads = torch.ops.amnets.lowrank_lstm_cell_backward(grad_h1, grad_c1, *ctx.saved_tensors)
    return _drop_unneeded(ctx, grads)


def _drop_unneeded(ctx, grads):
    """Backward computes all eight gradients; autograd gets None where no input wants one."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,)


register_autograd(lowrank_lstm_cell_forward, _cell_backward, _cell_setup)


class PreparedLowrankLstmCell:
    """lowrank_lstm_cell with its factors and bias checked once, for many inference steps (streaming).

    `PreparedLowrankLstmCell(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)(x, h, c)` equals
    `lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)` bit for bit, on the same face. The
    weights are checked here, once (their values may change in place, not their shapes); a call checks
    x (B, D), h and c (B, H) and goes straight to the face of the backend in force. A call that wants
    autograd or runs under tracing goes through lowrank_lstm_cell instead: same answer, with gradients.
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
        if not eager_inference(x, h, c, *self.weights):
            return lowrank_lstm_cell(x, h, c, *self.weights)
        h1, c1, _ = run(CELL, "forward", x, h, c, *self.weights, False)
        return h1, c1


def _layout(tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype) for t in tensors)


# ---------------------------------------------------------------------------------------------------
# sequence

SEQ = "lowrank_lstm_sequence"


def lowrank_lstm_sequence(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih_u: Tensor,
                          w_ih_v: Tensor, w_hh_u: Tensor, w_hh_v: Tensor,
                          bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """All T steps in one op: x (T, B, D), h0/c0 (B, H) or None (zeros) -> (out (T, B, H), h_n, c_n)."""
    _validate.tensor_types(SEQ, ("h0", "c0", "bias"), x=x, h0=h0, c0=c0, w_ih_u=w_ih_u, w_ih_v=w_ih_v,
                           w_hh_u=w_hh_u, w_hh_v=w_hh_v, bias=bias)
    return torch.ops.amnets.lowrank_lstm_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)


@composite("lowrank_lstm_sequence(Tensor x, Tensor? h0, Tensor? c0, Tensor w_ih_u, Tensor w_ih_v, "
           "Tensor w_hh_u, Tensor w_hh_v, Tensor? bias=None) -> (Tensor, Tensor, Tensor)")
def _lowrank_lstm_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias=None):
    _validate.lowrank_lstm(SEQ, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=True)
    state = (x.shape[1], w_hh_v.shape[1])
    h0 = x.new_zeros(state) if h0 is None else h0
    c0 = x.new_zeros(state) if c0 is None else c0
    save = wants_grad(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    out, h_n, c_n, _, _ = torch.ops.amnets.lowrank_lstm_sequence_forward(
        x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)
    return out, h_n, c_n


@custom_op("lowrank_lstm_sequence_forward")
def lowrank_lstm_sequence_forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih_u: Tensor, w_ih_v: Tensor,
                                  w_hh_u: Tensor, w_hh_v: Tensor, bias: Optional[Tensor],
                                  save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    return run(SEQ, "forward", x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)


def _check_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
    for name, t in (("h0", h0), ("c0", c0)):
        if t is None:
            raise TypeError(f"{SEQ}_forward: {name} must be a Tensor (the public op accepts None)")
    return _validate.lowrank_lstm(SEQ, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, sequence=True)


@lowrank_lstm_sequence_forward.register_fake
def _(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save):
    hidden = _check_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    steps, batch = x.shape[:2]
    acc = acc_dtype(x.dtype)
    gates = x.new_empty((steps, batch, 4 * hidden) if save else (0,), dtype=acc)
    cells = x.new_empty((steps, batch, hidden) if save else (0,), dtype=acc)
    return x.new_empty(steps, batch, hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cells


@custom_op("lowrank_lstm_sequence_backward")
def lowrank_lstm_sequence_backward(grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor,
                                   h0: Tensor, c0: Tensor, w_ih_u: Tensor, w_ih_v: Tensor, w_hh_u: Tensor,
                                   w_hh_v: Tensor, out: Tensor, gates: Tensor, cells: Tensor
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_sequence_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out,
                             gates, cells)
    return run(SEQ, "backward", grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v,
               out, gates, cells)


def _check_sequence_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out,
                             gates, cells):
    op = SEQ + "_backward"
    hidden = _validate.lowrank_lstm(op, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, None, sequence=True)
    steps, batch = x.shape[:2]
    _validate.grads_and_saved(op, {
        "grad_out": (grad_out, (steps, batch, hidden)), "grad_h_n": (grad_h_n, (batch, hidden)),
        "grad_c_n": (grad_c_n, (batch, hidden)), "out": (out, (steps, batch, hidden)),
        "gates": (gates, (steps, batch, 4 * hidden)), "cells": (cells, (steps, batch, hidden))})


@lowrank_lstm_sequence_backward.register_fake
def _(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out, gates, cells):
    _check_sequence_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out,
                             gates, cells)
    return (*(t.new_empty(t.shape) for t in (x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v)),
            x.new_empty(w_ih_u.shape[0]))


def _sequence_setup(ctx, inputs, output):
    x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save = inputs
    out, h_n, c_n, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out, gates, cells)


def _sequence_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    grads = torch.ops.amnets.lowrank_lstm_sequence_backward(grad_out, grad_h_n, grad_c_n, *ctx.saved_tensors)
    return _drop_unneeded(ctx, grads)


register_autograd(lowrank_lstm_sequence_forward, _sequence_backward, _sequence_setup)
