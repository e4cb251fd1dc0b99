"""Triton face of lowrank_lstm_cell and lowrank_lstm_sequence.

Contract: amnets_kernels/_ops/lowrank_lstm.py. Math and the hand-written BPTT:
amnets_kernels/reference/lowrank_lstm.py. Same structure as the CPU face, csrc/cpu/lowrank_lstm.cpp.

Design
------
Forward. The input part of every gate for all T frames does not depend on the recurrence, so it comes
first as two large GEMMs (torch.mm / addmm over all T*B rows): pre (T, B, 4H) = (x V_ih^T) U_ih^T + bias.
What is left per step is small and latency bound: s = h V_hh^T (B, rh), gates = pre[t] + s U_hh^T, the
activations and the state update. It runs one of two ways:

  * persistent (`_sequence_forward_kernel`): ONE launch for all T steps, one program per BLOCK_B = 16
    batch rows. A program owns all H hidden units of its rows, so no data ever crosses programs: no
    grid barrier, no inter-program synchronisation (and the interpreter, which runs programs one after
    another, exercises exactly the GPU semantics). Per step it walks H in chunks of 16: the chunk's four
    gates = pre[t] + s U_g^T (tl.dot, K = rh), activations, c and h, stores of out[t] (with save: the
    activated gates over pre[t], c_t into cells[t]), and s_next += h_chunk V^T[chunk] (tl.dot, K = 16).
    So s (16 x rh) is what a step hands to the next, in registers; h is never read back; c lives in a
    (B, H) buffer updated in place, ordered across steps by one tl.debug_barrier() per step (the
    argument is in the comment above the kernels). U_hh and V_hh are re-read each step from L1/L2.
  * per step: s = h V^T with torch.mm, then one fused launch (`_step_forward_kernel`, grid batch tiles x
    hidden chunks of 16) for gates = pre[t] + s U^T (K in chunks of 32 read from s in memory), the
    activations and the state update. The launch boundaries order the steps. (Computing s inside the
    fused kernel would make every hidden-chunk program repeat it: H / 16 times the work.)

Backward (BPTT), mirrored. The persistent `_sequence_backward_kernel` walks t backwards, chunk by chunk:
dL/dh_t = ds_{t+1} V[:, chunk] + grad_out[t] (+ dL/dh_T), the fused pointwise backward from the saved
gates and c_t, c_{t-1}, dpre[t] stored, dc in place, ds_t += dpre_g U_g[chunk] for the four gates; after
the loop dL/dh_0 = ds_0 V. The per-step path runs the pointwise backward (`_step_backward_kernel`) then
dh = (dpre[t] U) V as two torch.mm per step. Either way dpre is kept for all steps and the factor, input
and bias gradients are large GEMMs at the end (dx = (dpre U_ih) V_ih, dU = dpre^T (inp V^T),
dV = (dpre U)^T inp, dbias = sum of dpre), as in the CPU face. The cell is the sequence with T = 1.

Size limits of the persistent design (beyond them: the per-step path, any size)
------------------------------------------------------------------------------
  * rh: BLOCK_R = max(16, next_pow2(rh)) <= MAX_PERSISTENT_RANK = 64. The gate products take s whole as
    their K = BLOCK_R operand, and Triton's fp32/fp64 "ieee" tl.dot (FMA, no tensor cores) keeps a
    thread's whole K extent of both operands in registers: at BLOCK_R = 64 the forward needs 8 warps
    (~180 registers fp32, ~250 fp64, no spills); BLOCK_R = 128 spills.
  * H: no register or shared-memory limit (chunks of 16; at most 24 KiB shared per program). The limit
    is time: one SM does a whole step of its 16 rows, ~16 * 5 * H * rh FMAs, while the per-step path
    spreads a step over cdiv(B, 16) * cdiv(H, 16) programs at the price of two or three launches per
    step. Persistent while H * BLOCK_R <= MAX_PERSISTENT_WORK = 2**16 (H <= 4096 at rh <= 16, H <= 1024
    at rh <= 64). That threshold is an estimate (one SM's FMA rate against launch latency); it has not
    been tuned on a GPU. The factors re-read every step are then at most 5 * 2**16 elements (1.25 MiB
    fp32), L2-resident.
  * B: any (cdiv(B, 16) programs); B < 16 still pays for a 16-row tile (tl.dot needs M >= 16).
  * Offsets within one step are int32 (B * 4H < 2**31); step offsets are int64.

Dtypes: fp32 and fp64 run in their own precision (fp64 has its own kernels: fp64 tl.dot); fp16/bf16
inputs are cast to fp32 up front (h and c are carried in fp32, outputs rounded at the end), as the
reference does. So every kernel sees only fp32 or fp64 tensors (the interpreter's bf16 arithmetic never
comes into play), and every tl.dot is input_precision="ieee" (TF32 would miss the fp32 tolerance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import AotConfig
from .._dtypes import acc_dtype
from ._common import launch_turn

BLOCK_B = 16  # batch rows per program: the smallest M tl.dot takes
PERSISTENT_BLOCK_H = 16  # hidden units per chunk in the persistent kernels
MAX_PERSISTENT_RANK = 64  # largest BLOCK_R of the persistent kernels (registers; module docstring)
MAX_PERSISTENT_WORK = 2**16  # largest H * BLOCK_R of the persistent kernels (step time; module docstring)
STEP_BLOCK_H, STEP_BLOCK_R = 16, 32  # per-step forward: hidden units per program, K chunk of s U^T
STEP_POINTWISE_H = 64  # per-step backward (pointwise only): hidden units per program


# ---------------------------------------------------------------------------------------------------
# pointwise pieces


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: saturates cleanly (exp overflow gives +-1, never nan)
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _cell_update(pi, pf, pg, po, c):
    """Activations of the four gate pre-activations and the new state: (i, f, g, o, c', h')."""
    i = _sigmoid(pi)
    f = _sigmoid(pf)
    g = _tanh(pg)
    o = _sigmoid(po)
    c = f * c + i * g
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _cell_backward(i, f, g, o, c_t, c_prev, dh, dc):
    """d(pre-activation) of the four gates and dL/dc_prev from dL/dh_t, dL/dc_t (reference _step_backward)."""
    tc = _tanh(c_t)
    d = dc + dh * o * (1.0 - tc * tc)
    di = d * g * i * (1.0 - i)
    df = d * c_prev * f * (1.0 - f)
    dg = d * i * (1.0 - g * g)
    do = dh * tc * o * (1.0 - o)
    return di, df, dg, do, d * f


# ---------------------------------------------------------------------------------------------------
# persistent kernels: one launch for the whole sequence, one program per BLOCK_B batch rows
#
# A program owns BLOCK_B batch rows and all H hidden units of them and walks the hidden units in chunks
# of BLOCK_H. What a step hands to the next is s = h_t V^T (BLOCK_B, rh) (backward: ds_t = dpre_t U),
# carried in registers: it is accumulated chunk by chunk as h_t is produced (s_next += h_chunk V^T[chunk]),
# so h is never read back. Every tl.dot has K = BLOCK_H or BLOCK_R, which bounds the registers (Triton's
# fp32/fp64 "ieee" dot holds a thread's whole K extent of both operands in registers).
#
# Why this needs no grid barrier and has no race (the interpreter runs programs one at a time and cannot
# show one, so the argument is written here):
#   * Programs share nothing they write: every store goes to the program's own batch rows (out, cells,
#     c or dc, pre or dpre); U, V, h0, c0, grad_out and the saved gates/cells are only read.
#   * Within a program, memory that is written and read again:
#     - pre[t] -> gates[t], elementwise within one chunk: the value stored at an element is computed
#       from the value loaded there, so the load comes first, whichever threads Triton assigns them to;
#     - c (forward) / dc (backward), one (B, H) buffer updated in place: step t stores an element and the
#       next step loads it, maybe from another thread of the CTA (Triton picks the layouts). The
#       tl.debug_barrier() that ends each step (bar.sync: the CTA's memory accesses before it are
#       performed with respect to all its threads after it) orders the two.
#   * num_stages=1: no software pipelining moves a load of the next step ahead of that barrier.


@triton.jit
def _sequence_forward_kernel(pre_ptr, h0_ptr, u_ptr, v_ptr, out_ptr, c_ptr, cells_ptr,
                             steps, batch, hidden, rank, save,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    # pre (T, B, 4H): input part of the gates, overwritten by the activated gates when save;
    # u = w_hh_u (4H, rh), v = w_hh_v (rh, H); out, cells (T, B, H); c (B, H): c0 in, c_T out.
    # Everything in the accumulation dtype.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    ranks = tl.arange(0, BLOCK_R)
    r_ok = ranks < rank
    gate_u = hidden * rank  # offset of the next gate's block in U
    acc_t = pre_ptr.dtype.element_ty

    s = tl.zeros((BLOCK_B, BLOCK_R), dtype=acc_t)  # s = h0 V^T
    for j0 in range(0, hidden, BLOCK_H):
        units = j0 + tl.arange(0, BLOCK_H)
        unit_ok = units < hidden
        h = tl.load(h0_ptr + rows[:, None] * hidden + units[None, :], mask=row_ok[:, None] & unit_ok[None, :],
                    other=0.0)
        s += tl.dot(h, tl.load(v_ptr + ranks[None, :] * hidden + units[:, None],
                               mask=unit_ok[:, None] & r_ok[None, :], other=0.0), input_precision="ieee")

    for t in range(steps):
        step = tl.cast(t, tl.int64)  # int64 step offsets: T B 4H may pass 2**31
        pre_t = pre_ptr + step * batch * 4 * hidden
        out_t = out_ptr + step * batch * hidden
        cells_t = cells_ptr + step * batch * hidden
        s_next = tl.zeros((BLOCK_B, BLOCK_R), dtype=acc_t)
        for j0 in range(0, hidden, BLOCK_H):
            units = j0 + tl.arange(0, BLOCK_H)
            unit_ok = units < hidden
            mask = row_ok[:, None] & unit_ok[None, :]
            gate = rows[:, None] * (4 * hidden) + units[None, :]  # gate i; + k*H for the others
            state = rows[:, None] * hidden + units[None, :]
            # U^T of this chunk, gate by gate (rh, BLOCK_H), zero outside (rh, H)
            ut = units[None, :] * rank + ranks[:, None]
            ut_mask = r_ok[:, None] & unit_ok[None, :]
            pi = tl.load(pre_t + gate, mask=mask, other=0.0) + tl.dot(
                s, tl.load(u_ptr + ut, mask=ut_mask, other=0.0), input_precision="ieee")
            pf = tl.load(pre_t + gate + hidden, mask=mask, other=0.0) + tl.dot(
                s, tl.load(u_ptr + gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
            pg = tl.load(pre_t + gate + 2 * hidden, mask=mask, other=0.0) + tl.dot(
                s, tl.load(u_ptr + 2 * gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
            po = tl.load(pre_t + gate + 3 * hidden, mask=mask, other=0.0) + tl.dot(
                s, tl.load(u_ptr + 3 * gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
            i, f, g, o, c, h = _cell_update(pi, pf, pg, po, tl.load(c_ptr + state, mask=mask, other=0.0))
            # padded rows/units: pre = 0 and c = 0 give c' = 0, h' = 0, so they add nothing to s_next
            tl.store(c_ptr + state, c, mask=mask)
            tl.store(out_t + state, h, mask=mask)
            if save != 0:
                tl.store(pre_t + gate, i, mask=mask)
                tl.store(pre_t + gate + hidden, f, mask=mask)
                tl.store(pre_t + gate + 2 * hidden, g, mask=mask)
                tl.store(pre_t + gate + 3 * hidden, o, mask=mask)
                tl.store(cells_t + state, c, mask=mask)
            vt = tl.load(v_ptr + ranks[None, :] * hidden + units[:, None],
                         mask=unit_ok[:, None] & r_ok[None, :], other=0.0)
            s_next += tl.dot(h, vt, input_precision="ieee")  # next step's recurrent input
        s = s_next
        tl.debug_barrier()  # c_t stored above is loaded by step t+1 (see the block comment)


@triton.jit
def _sequence_backward_kernel(gates_ptr, cells_ptr, c0_ptr, grad_out_ptr, grad_h_ptr, u_ptr, v_ptr,
                              dpre_ptr, dc_ptr, dh0_ptr, steps, batch, hidden, rank,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    # gates (T, B, 4H) activated, cells (T, B, H) = c_t, grad_out (T, B, H), grad_h (B, H) = dL/dh_T;
    # dc (B, H): dL/dc_T in, dL/dc_0 out (in place). Writes dpre (T, B, 4H) and dh0 (B, H) = dL/dh_0.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    ranks = tl.arange(0, BLOCK_R)
    r_ok = ranks < rank
    gate_u = hidden * rank
    acc_t = dpre_ptr.dtype.element_ty

    ds = tl.zeros((BLOCK_B, BLOCK_R), dtype=acc_t)  # dpre_{t+1} U: nothing comes back from after T
    for it in range(steps):
        t = steps - 1 - it
        step = tl.cast(t, tl.int64)  # int64 step offsets: T B 4H may pass 2**31
        gates_t = gates_ptr + step * batch * 4 * hidden
        dpre_t = dpre_ptr + step * batch * 4 * hidden
        cells_t = cells_ptr + step * batch * hidden
        grad_out_t = grad_out_ptr + step * batch * hidden
        ds_next = tl.zeros((BLOCK_B, BLOCK_R), dtype=acc_t)
        for j0 in range(0, hidden, BLOCK_H):
            units = j0 + tl.arange(0, BLOCK_H)
            unit_ok = units < hidden
            mask = row_ok[:, None] & unit_ok[None, :]
            gate = rows[:, None] * (4 * hidden) + units[None, :]
            state = rows[:, None] * hidden + units[None, :]
            # dL/dh_t: through the recurrent product from step t+1, (dpre_{t+1} U) V, plus the output's
            # own gradient, plus dL/dh_T at the last step
            v = tl.load(v_ptr + ranks[:, None] * hidden + units[None, :],
                        mask=r_ok[:, None] & unit_ok[None, :], other=0.0)
            dh = tl.dot(ds, v, input_precision="ieee")
            dh += tl.load(grad_out_t + state, mask=mask, other=0.0)
            dh += tl.load(grad_h_ptr + state, mask=mask & (t == steps - 1), other=0.0)
            i = tl.load(gates_t + gate, mask=mask, other=0.0)
            f = tl.load(gates_t + gate + hidden, mask=mask, other=0.0)
            g = tl.load(gates_t + gate + 2 * hidden, mask=mask, other=0.0)
            o = tl.load(gates_t + gate + 3 * hidden, mask=mask, other=0.0)
            c_t = tl.load(cells_t + state, mask=mask, other=0.0)
            # c_{t-1}: cells[t-1], or c0 at t = 0 (two predicated loads instead of a branch)
            c_prev = (tl.load(cells_t - batch * hidden + state, mask=mask & (t > 0), other=0.0)
                      + tl.load(c0_ptr + state, mask=mask & (t == 0), other=0.0))
            # padded lanes load gates = 0: their dpre and dc are 0 and add nothing to ds_next
            di, df, dg, do, dc = _cell_backward(i, f, g, o, c_t, c_prev, dh,
                                                tl.load(dc_ptr + state, mask=mask, other=0.0))
            tl.store(dc_ptr + state, dc, mask=mask)
            tl.store(dpre_t + gate, di, mask=mask)
            tl.store(dpre_t + gate + hidden, df, mask=mask)
            tl.store(dpre_t + gate + 2 * hidden, dg, mask=mask)
            tl.store(dpre_t + gate + 3 * hidden, do, mask=mask)
            # this chunk's part of ds_t = dpre_t U, gate by gate: U rows of the chunk (BLOCK_H, rh)
            u = units[:, None] * rank + ranks[None, :]
            u_mask = unit_ok[:, None] & r_ok[None, :]
            ds_next += tl.dot(di, tl.load(u_ptr + u, mask=u_mask, other=0.0), input_precision="ieee")
            ds_next += tl.dot(df, tl.load(u_ptr + gate_u + u, mask=u_mask, other=0.0),
                              input_precision="ieee")
            ds_next += tl.dot(dg, tl.load(u_ptr + 2 * gate_u + u, mask=u_mask, other=0.0),
                              input_precision="ieee")
            ds_next += tl.dot(do, tl.load(u_ptr + 3 * gate_u + u, mask=u_mask, other=0.0),
                              input_precision="ieee")
        ds = ds_next
        tl.debug_barrier()  # dc stored above is loaded by step t-1 (see the block comment)

    for j0 in range(0, hidden, BLOCK_H):  # dL/dh_0 = ds_0 V
        units = j0 + tl.arange(0, BLOCK_H)
        unit_ok = units < hidden
        v = tl.load(v_ptr + ranks[:, None] * hidden + units[None, :], mask=r_ok[:, None] & unit_ok[None, :],
                    other=0.0)
        tl.store(dh0_ptr + rows[:, None] * hidden + units[None, :], tl.dot(ds, v, input_precision="ieee"),
                 mask=row_ok[:, None] & unit_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# per-step kernels: beyond the persistent limits, one step at a time, grid (batch tiles, hidden chunks)
#
# A program here owns a (BLOCK_B, BLOCK_H) tile of one step and nothing carries over between launches
# except through memory, so a launch boundary is the step-to-step synchronisation. The small recurrent
# GEMMs around them (s = h V^T forward; ds = dpre U, dh = ds V backward) are torch.mm calls: computing s
# inside every hidden-chunk program would repeat it H / BLOCK_H times, and one GEMM per step is cheap.


@triton.jit
def _step_forward_kernel(pre_ptr, s_ptr, c_in_ptr, u_ptr, h_out_ptr, c_out_ptr, batch, hidden, rank, save,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    # pre (B, 4H) of this step (activated gates written over it when save), s (B, rh) = h_{t-1} V^T,
    # c_in (B, H) = c_{t-1}; writes h_out, c_out (B, H) (c_out may be c_in: each element is read and then
    # written by this program alone).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < batch
    unit_ok = units < hidden
    mask = row_ok[:, None] & unit_ok[None, :]
    gate = rows[:, None] * (4 * hidden) + units[None, :]
    state = rows[:, None] * hidden + units[None, :]
    gate_u = hidden * rank
    pi = tl.load(pre_ptr + gate, mask=mask, other=0.0)
    pf = tl.load(pre_ptr + gate + hidden, mask=mask, other=0.0)
    pg = tl.load(pre_ptr + gate + 2 * hidden, mask=mask, other=0.0)
    po = tl.load(pre_ptr + gate + 3 * hidden, mask=mask, other=0.0)
    for r0 in range(0, rank, BLOCK_R):  # gates += s U^T, K = BLOCK_R at a time (bounds the registers)
        ranks = r0 + tl.arange(0, BLOCK_R)
        r_ok = ranks < rank
        sr = tl.load(s_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & r_ok[None, :],
                     other=0.0)
        ut = units[None, :] * rank + ranks[:, None]
        ut_mask = r_ok[:, None] & unit_ok[None, :]
        pi += tl.dot(sr, tl.load(u_ptr + ut, mask=ut_mask, other=0.0), input_precision="ieee")
        pf += tl.dot(sr, tl.load(u_ptr + gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
        pg += tl.dot(sr, tl.load(u_ptr + 2 * gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
        po += tl.dot(sr, tl.load(u_ptr + 3 * gate_u + ut, mask=ut_mask, other=0.0), input_precision="ieee")
    i, f, g, o, c, h = _cell_update(pi, pf, pg, po, tl.load(c_in_ptr + state, mask=mask, other=0.0))
    tl.store(h_out_ptr + state, h, mask=mask)
    tl.store(c_out_ptr + state, c, mask=mask)
    if save != 0:  # in place over pre: this program alone reads and writes these elements
        tl.store(pre_ptr + gate, i, mask=mask)
        tl.store(pre_ptr + gate + hidden, f, mask=mask)
        tl.store(pre_ptr + gate + 2 * hidden, g, mask=mask)
        tl.store(pre_ptr + gate + 3 * hidden, o, mask=mask)


@triton.jit
def _step_backward_kernel(dh_ptr, grad_out_ptr, dc_ptr, gates_ptr, c_t_ptr, c_prev_ptr, dpre_ptr,
                          batch, hidden, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    # Pointwise backward of step t: dh (B, H) = recurrent part of dL/dh_t (dL/dh_T at the last step),
    # grad_out (B, H) its output's gradient; dc (B, H) enters as dL/dc_t and leaves as dL/dc_{t-1}, in
    # place (one owner per element); writes dpre (B, 4H).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (units < hidden)[None, :]
    state = rows[:, None] * hidden + units[None, :]
    gate = rows[:, None] * (4 * hidden) + units[None, :]
    dh = tl.load(dh_ptr + state, mask=mask, other=0.0) + tl.load(grad_out_ptr + state, mask=mask, other=0.0)
    i = tl.load(gates_ptr + gate, mask=mask, other=0.0)
    f = tl.load(gates_ptr + gate + hidden, mask=mask, other=0.0)
    g = tl.load(gates_ptr + gate + 2 * hidden, mask=mask, other=0.0)
    o = tl.load(gates_ptr + gate + 3 * hidden, mask=mask, other=0.0)
    c_t = tl.load(c_t_ptr + state, mask=mask, other=0.0)
    c_prev = tl.load(c_prev_ptr + state, mask=mask, other=0.0)
    dc = tl.load(dc_ptr + state, mask=mask, other=0.0)
    di, df, dg, do, dc = _cell_backward(i, f, g, o, c_t, c_prev, dh, dc)
    tl.store(dpre_ptr + gate, di, mask=mask)
    tl.store(dpre_ptr + gate + hidden, df, mask=mask)
    tl.store(dpre_ptr + gate + 2 * hidden, dg, mask=mask)
    tl.store(dpre_ptr + gate + 3 * hidden, do, mask=mask)
    tl.store(dc_ptr + state, dc, mask=mask)


# ---------------------------------------------------------------------------------------------------
# configurations and the one launcher: a launch can only use a configuration listed in AOT_CONFIGS

_DTYPES = {torch.float32: "fp32", torch.float64: "fp64"}
# persistent kernels: BLOCK_R -> num_warps (forward, backward). More warps spread the (BLOCK_B, BLOCK_H)
# outputs of each dot thinner, which is what keeps the K = BLOCK_R operands of the forward's gate
# products in registers at BLOCK_R = 64.
_PERSISTENT_WARPS = {16: (4, 4), 32: (4, 4), 64: (8, 4)}


def _config_name(kernel, acc: torch.dtype, constexprs: dict) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in constexprs.items())
    return f"lowrank_lstm.{kernel.__name__.strip('_')}[{_DTYPES[acc]},{blocks}]"


def _make_config(kernel, acc: torch.dtype, constexprs: dict, num_warps: int, num_stages: int) -> AotConfig:
    signature = {n: "constexpr" if n in constexprs else (f"*{_DTYPES[acc]}" if n.endswith("_ptr") else "i32")
                 for n in kernel.arg_names}
    return AotConfig(_config_name(kernel, acc, constexprs), kernel, signature, dict(constexprs), num_warps,
                     num_stages)


def _all_configs() -> dict:
    configs = []
    for acc in _DTYPES:
        for block_r, warps in _PERSISTENT_WARPS.items():
            blocks = dict(BLOCK_B=BLOCK_B, BLOCK_H=PERSISTENT_BLOCK_H, BLOCK_R=block_r)
            configs.append(_make_config(_sequence_forward_kernel, acc, blocks, warps[0], 1))
            configs.append(_make_config(_sequence_backward_kernel, acc, blocks, warps[1], 1))
        blocks = dict(BLOCK_B=BLOCK_B, BLOCK_H=STEP_BLOCK_H, BLOCK_R=STEP_BLOCK_R)
        configs.append(_make_config(_step_forward_kernel, acc, blocks, 4, 1))
        blocks = dict(BLOCK_B=BLOCK_B, BLOCK_H=STEP_POINTWISE_H)
        configs.append(_make_config(_step_backward_kernel, acc, blocks, 4, 1))
    return {c.name: c for c in configs}


_CONFIGS = _all_configs()
AOT_CONFIGS = list(_CONFIGS.values())


def _launch(kernel, grid, *args, **constexprs):
    """Launch `kernel` with the AOT-registered configuration for these constexprs and the tensors' dtype
    (a KeyError here is a configuration `python -m amnets_kernels.aot` never checked)."""
    acc = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    config = _CONFIGS[_config_name(kernel, acc, constexprs)]
    with launch_turn():
        kernel[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


def persistent_block_r(hidden: int, rank: int):
    """BLOCK_R of the persistent kernels for this size, or None when it takes the per-step path."""
    block_r = max(16, triton.next_power_of_2(rank))
    return block_r if block_r <= MAX_PERSISTENT_RANK and hidden * block_r <= MAX_PERSISTENT_WORK else None


# ---------------------------------------------------------------------------------------------------
# the time loops


def _recur(pre, h0, c0, u, v, save: bool):
    """Forward time loop over pre (T, B, 4H) (activated gates written over it when save) from (h0, c0).
    Returns out (T, B, H), h_n, c_n and cells (T, B, H) (or an empty tensor); all in pre's dtype."""
    steps, batch, four_h = pre.shape
    hidden, rank = four_h // 4, v.shape[0]
    out = pre.new_empty(steps, batch, hidden)
    cells = pre.new_empty(steps, batch, hidden) if save else pre.new_empty(0)
    c = c0.clone()  # c_t, in place, ends as c_T
    block_r = persistent_block_r(hidden, rank)
    if block_r is not None:
        _launch(_sequence_forward_kernel, (triton.cdiv(batch, BLOCK_B),), pre, h0, u, v, out, c, cells,
                steps, batch, hidden, rank, int(save),
                BLOCK_B=BLOCK_B, BLOCK_H=PERSISTENT_BLOCK_H, BLOCK_R=block_r)
        return out, out[-1].clone(), c, cells
    s = pre.new_empty(batch, rank)
    grid = (triton.cdiv(batch, BLOCK_B), triton.cdiv(hidden, STEP_BLOCK_H))
    for t in range(steps):
        torch.mm(out[t - 1] if t > 0 else h0, v.T, out=s)
        c_in, c_out = ((cells[t - 1] if t > 0 else c0), cells[t]) if save else (c, c)
        _launch(_step_forward_kernel, grid, pre[t], s, c_in, u, out[t], c_out, batch, hidden, rank, int(save),
                BLOCK_B=BLOCK_B, BLOCK_H=STEP_BLOCK_H, BLOCK_R=STEP_BLOCK_R)
    return out, out[-1].clone(), cells[-1].clone() if save else c, cells


def _backprop(grad_out, grad_h, grad_c, gates, cells, c0, u, v):
    """BPTT time loop: dpre (T, B, 4H), dL/dh_0, dL/dc_0 (all in the accumulation dtype)."""
    steps, batch, four_h = gates.shape
    hidden, rank = four_h // 4, v.shape[0]
    dpre = torch.empty_like(gates)
    dc = grad_c.clone()  # dL/dc_t, in place, ends as dL/dc_0
    block_r = persistent_block_r(hidden, rank)
    if block_r is not None:
        dh0 = torch.empty_like(c0)
        _launch(_sequence_backward_kernel, (triton.cdiv(batch, BLOCK_B),), gates, cells, c0, grad_out, grad_h,
                u, v, dpre, dc, dh0, steps, batch, hidden, rank,
                BLOCK_B=BLOCK_B, BLOCK_H=PERSISTENT_BLOCK_H, BLOCK_R=block_r)
        return dpre, dh0, dc
    dh = grad_h.clone()  # recurrent part of dL/dh_t (dL/dh_T to start), ends as dL/dh_0
    ds = gates.new_empty(batch, rank)
    grid = (triton.cdiv(batch, BLOCK_B), triton.cdiv(hidden, STEP_POINTWISE_H))
    for t in reversed(range(steps)):
        c_prev = cells[t - 1] if t > 0 else c0
        _launch(_step_backward_kernel, grid, dh, grad_out[t], dc, gates[t], cells[t], c_prev, dpre[t],
                batch, hidden, BLOCK_B=BLOCK_B, BLOCK_H=STEP_POINTWISE_H)
        torch.mm(dpre[t], u, out=ds)  # dL/dh_{t-1} through the recurrent product: (dpre U) V
        torch.mm(ds, v, out=dh)
    return dpre, dh, dc


# ---------------------------------------------------------------------------------------------------
# the face


def _acc(acc, *tensors):
    return [None if t is None else t.to(acc).contiguous() for t in tensors]


def lowrank_lstm_sequence_forward(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save: bool):
    acc = acc_dtype(x.dtype)
    x_, h, c, iu, iv, hu, hv, b_ = _acc(acc, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    steps, batch, d = x.shape
    rows = x_.reshape(steps * batch, d)
    # input part of the gates for all T frames: two large GEMMs (+ bias), only the recurrence loops
    s = rows @ iv.T
    pre = (s @ iu.T if b_ is None else torch.addmm(b_, s, iu.T)).view(steps, batch, iu.shape[0])  # B may be 0
    out, h_n, c_n, cells = _recur(pre, h, c, hu, hv, save)
    gates = pre if save else pre.new_empty(0)
    return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype), gates, cells


def _factor_grads(dpre, inp, w_u, w_v):
    """For pre += (inp V^T) U^T over rows: (d inp, dU, dV)."""
    ds = dpre @ w_u
    return ds @ w_v, dpre.T @ (inp @ w_v.T), ds.T @ inp


def _gradients(grad_out, grad_h_n, grad_c_n, x, h_prev, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, gates, cells):
    """All eight gradients; h_prev (T, B, H) is the recurrence's input at every step."""
    acc = acc_dtype(x.dtype)
    g_out, dh, dc, x_, h_prev, c0_, iu, iv, hu, hv, cells_, gates_ = _acc(
        acc, grad_out, grad_h_n, grad_c_n, x, h_prev, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, cells, gates)
    dpre, dh0, dc0 = _backprop(g_out, dh, dc, gates_, cells_, c0_, hu, hv)
    rows = dpre.view(-1, dpre.shape[-1])
    # factor, input and bias gradients for all steps at once: large GEMMs
    dx, d_iu, d_iv = _factor_grads(rows, x_.reshape(rows.shape[0], -1), iu, iv)
    hs = h_prev.reshape(rows.shape[0], -1)
    ds = rows @ hu
    d_hu, d_hv = rows.T @ (hs @ hv.T), ds.T @ hs
    grads = (dx.view(x.shape), dh0, dc0, d_iu, d_iv, d_hu, d_hv, rows.sum(0))
    return tuple(g.to(x.dtype) for g in grads)


def lowrank_lstm_sequence_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v,
                                   out, gates, cells):
    h_prev = torch.cat([h0[None], out[:-1]])  # the rounded outputs, as the reference uses them
    return _gradients(grad_out, grad_h_n, grad_c_n, x, h_prev, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, gates,
                      cells)


def lowrank_lstm_cell_forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save: bool):
    _, h1, c1, gates, _ = lowrank_lstm_sequence_forward(x[None], h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias,
                                                        save)
    return h1, c1, gates[0] if save else gates


def lowrank_lstm_cell_backward(grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates):
    grads = _gradients(torch.zeros_like(grad_h1)[None], grad_h1, grad_c1, x[None], h[None], c, w_ih_u, w_ih_v,
                       w_hh_u, w_hh_v, gates[None], c1[None])
    return (grads[0][0], *grads[1:])
