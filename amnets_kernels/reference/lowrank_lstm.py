"""Reference faces of lowrank_lstm_cell and lowrank_lstm_sequence.

gates = x V_ih^T U_ih^T + h V_hh^T U_hh^T + bias, split i, f, g, o as in nn.LSTM;
c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c').
Workspace saved for backward (save=True): the activated gates (.., 4H) and, for the sequence, every
c_t (T, B, H); both in the accumulation dtype. Backward is written out by hand (BPTT) so the compiled
faces have a line-by-line model; tests check it against torch.autograd and gradcheck.
"""

import torch
from torch import Tensor

from . import acc_dtype


def _activate(pre: Tensor) -> Tensor:
    i, f, g, o = pre.chunk(4, dim=-1)
    return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=-1)


def _input_projection(x, w_ih_u, w_ih_v, bias):
    pre = (x @ w_ih_v.T) @ w_ih_u.T
    return pre if bias is None else pre + bias


def _step(pre_x, h, c, w_hh_u, w_hh_v):
    """One time step from the input part of the gates: (h', c', activated gates)."""
    gates = _activate(pre_x + (h @ w_hh_v.T) @ w_hh_u.T)
    i, f, g, o = gates.chunk(4, dim=-1)
    c1 = f * c + i * g
    return o * c1.tanh(), c1, gates


def _step_backward(dh, dc, c_prev, c1, gates):
    """Gradients of the gate pre-activations (B, 4H) and of c_prev, given dL/dh' and dL/dc'."""
    i, f, g, o = gates.chunk(4, dim=-1)
    tc = c1.tanh()
    dc = dc + dh * o * (1 - tc * tc)
    dpre = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                      dh * tc * o * (1 - o)], dim=-1)
    return dpre, dc * f


def _factor_grads(dpre, inp, w_u, w_v):
    """For pre += (inp V^T) U^T: (d inp, dU, dV), with dpre and inp flattened to rows."""
    s = inp @ w_v.T
    ds = dpre @ w_u
    return ds @ w_v, dpre.T @ s, ds.T @ inp


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def lowrank_lstm_cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save: bool):
    acc = acc_dtype(x.dtype)
    x_, h_, c_, iu, iv, hu, hv, b_ = _cast(acc, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    h1, c1, gates = _step(_input_projection(x_, iu, iv, b_), h_, c_, hu, hv)
    return h1.to(x.dtype), c1.to(x.dtype), (gates if save else x.new_empty(0, dtype=acc))


def lowrank_lstm_cell_backward(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates):
    acc = acc_dtype(x.dtype)
    dh1, dc1, x_, h_, c_, iu, iv, hu, hv, c1_ = _cast(acc, grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v,
                                                     w_hh_u, w_hh_v, c1)
    dpre, dc = _step_backward(dh1, dc1, c_, c1_, gates.to(acc))
    dx, d_iu, d_iv = _factor_grads(dpre, x_, iu, iv)
    dh, d_hu, d_hv = _factor_grads(dpre, h_, hu, hv)
    grads = (dx, dh, dc, d_iu, d_iv, d_hu, d_hv, dpre.sum(0))
    return tuple(g.to(x.dtype) for g in grads)


def lowrank_lstm_sequence_forward(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save: bool):
    acc = acc_dtype(x.dtype)
    x_, h, c, iu, iv, hu, hv, b_ = _cast(acc, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    pre_x = _input_projection(x_, iu, iv, b_)  # all T frames at once; only the recurrence loops
    outs, all_gates, cells = [], [], []
    for t in range(x.shape[0]):
        h, c, gates = _step(pre_x[t], h, c, hu, hv)
        outs.append(h)
        all_gates.append(gates)
        cells.append(c)
    empty = x.new_empty(0, dtype=acc)
    return (torch.stack(outs).to(x.dtype), h.to(x.dtype), c.to(x.dtype),
            torch.stack(all_gates) if save else empty, torch.stack(cells) if save else empty.clone())


def lowrank_lstm_sequence_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u,
                                   w_hh_v, out, gates, cells):
    acc = acc_dtype(x.dtype)
    g_out, dh, dc, x_, h0_, c0_, iu, iv, hu, hv, out_ = _cast(
        acc, grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out)
    steps = x.shape[0]
    h_prev = torch.cat([h0_[None], out_[:-1]])  # input of the recurrence at each step
    c_prev = torch.cat([c0_[None], cells.to(acc)[:-1]])
    dpre = torch.empty_like(gates, dtype=acc)
    for t in reversed(range(steps)):
        dpre[t], dc = _step_backward(dh + g_out[t], dc, c_prev[t], cells[t].to(acc), gates[t].to(acc))
        dh = (dpre[t] @ hu) @ hv  # dL/dh_{t-1} through the recurrent low-rank product
    rows = dpre.reshape(-1, dpre.shape[-1])
    dx, d_iu, d_iv = _factor_grads(rows, x_.reshape(-1, x.shape[-1]), iu, iv)
    _, d_hu, d_hv = _factor_grads(rows, h_prev.reshape(-1, h_prev.shape[-1]), hu, hv)
    grads = (dx.view_as(x_), dh, dc, d_iu, d_iv, d_hu, d_hv, rows.sum(0))
    return tuple(g.to(x.dtype) for g in grads)
