"""Triton face of rnnt_loss and fused_joint_rnnt_loss (contract: amnets_kernels/_ops/rnnt.py; math:
amnets_kernels/reference/rnnt.py).

Design. The lattice recursions need only two log-probs per cell (t, u): lp_blank and lp_y. Everything
V-sized is a streaming pass or a tile recomputed on the fly; everything else is O(B*T*U).

rnnt_loss forward
  _row_stats_kernel   BLOCK_R rows (b, t, u) per program, V streamed in BLOCK_V columns with an online
                      logsumexp (fp32 whatever the input dtype): den, lp_blank, lp_y. Rows off the
                      lattice (t >= T_b or u > U_b) are skipped.
  _lattice_kernel     grid (B, 2): program (b, 0) computes alpha and the cost, (b, 1) beta, at the same
                      time. Each loops over the T_b frames; within a frame the recursion along u,
                      x(u) = logaddexp(stay(u), x(u-1) + lp_y), is a first-order linear recurrence in the
                      log semiring, so it is one tl.associative_scan over a block of U+1 lanes (pairs
                      (A, E) compose as (logaddexp(A2, E2 + A1), E1 + E2)). Beta runs the same code with
                      u read backwards (lane j holds u = U_b - j), so no reverse scan is needed.
rnnt_loss backward
  _rnnt_grad_kernel   one streaming pass over V per row: occupancy * softmax - gamma_blank [k = blank]
                      - gamma_y [k = y], clamped per sequence, times grad_costs[b]; zero off the lattice
                      and for sequences whose log P (read off the saved beta(0, 0)) is not finite.
fused joint (logits = act(enc[:, :, None] + pred[:, None]) @ weight.T + bias)
  _joint_forward_kernel   a tile of 8 x 8 cells per program; per V block, the logits tile is tl.dot of
                      act(enc + pred) (recomputed per BLOCK_K hidden units: H may be large) and weight.T,
                      then the same online logsumexp and the two picked log-probs; then _lattice_kernel.
                      The (B, T, U+1, V) logits never exist.
  backward            runs over chunks of cell tiles, DLOGITS_CHUNK_BYTES of d logits at a time (64 MiB:
                      a bounded slice, never all of them): _joint_dlogits_kernel recomputes each
                      tile's logits and writes its d logits (and grad_bias, by atomics); then two GEMMs
                      read the chunk: _joint_dweight_kernel (grad_weight += d^T act, reduced over the
                      chunk's cells in registers) and _joint_dhidden_kernel (d act = d @ weight, reduced
                      over V in registers, times act', summed over u into grad_enc and over t into
                      grad_pred by atomics). Accumulating grad_weight tile by tile with atomics would
                      take (cells / 64) * V * H atomic adds, more time than all the GEMMs. Atomic sums
                      make the gradients' last bits vary from run to run on a GPU.

Numbers. Everything accumulates in float32 (float64 for float64 inputs), whatever the input dtype.
The joint's tl.dot takes operands in the input dtype (tensor cores for fp16/bf16: the activation and
d logits are rounded to it first) and uses IEEE fp32, not TF32, for float32, so that float32 should
match the reference on a GPU as it does under the interpreter (it runs on the FMA units, though: use
fp16/bf16 for speed). Under
TRITON_INTERPRET=1, bf16 operands go into tl.dot as float32: the interpreter's bf16 arithmetic is wrong.
Memory: O(B*T*U) workspace, plus for the joint's backward one chunk of d logits.

Limits (ValueError beyond): U+1 <= 4096 (the lattice keeps a frame's U+1 cells in one block), fewer
than 2**31 lattice cells B*T*(U+1), and for the joint fewer than 2**31 weight elements V*H. T, V and
H are otherwise unbounded (loops). The workspace differs from the reference face's off the lattice
(alphas and betas are -inf there, den is 0): only this face's backward reads it.
"""

import inspect
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..aot import AotConfig
from .._dtypes import acc_dtype
from ._common import INTERPRETED as _INTERPRETED
from ._common import acc as _acc
from ._common import cast as _cast
from ._common import launch_turn

ACTIVATIONS = {"tanh": 0, "relu": 1, "identity": 2}

# ---------------------------------------------------------------------------------------------------
# small device helpers


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)); -inf (not NaN, and no log(0)) when both are -inf; NaN when either is NaN, so
    that a NaN log-prob makes its sequence's cost NaN. Selects, not tl.maximum, which drops a NaN operand:
    a NaN makes s NaN, and `s < 1` is false for NaN, so it reaches the log."""
    m = tl.where(a > b, a, b)
    none = m == float("-inf")
    m = tl.where(none, 0.0, m)
    s = tl.exp(a - m) + tl.exp(b - m)  # in [1, 2] unless both are -inf
    return tl.where(none, float("-inf"), m + tl.log(tl.where(s < 1.0, 1.0, s)))


@triton.jit
def _then(a1, e1, a2, e2):
    """Compose two steps x -> logaddexp(A, E + x) of a lattice row: first (a1, e1), then (a2, e2)."""
    return _logaddexp(a2, e2 + a1), e1 + e2


@triton.jit
def _lse_update(m, s, x):
    """Fold a (R, C) tile x into each row's running max m and sum s of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)


@triton.jit
def _lse_finish(m, s):
    # s >= 1 whenever m is finite (the maximum contributes exp(0)). A NaN or +inf logit makes s NaN
    # (exp(NaN), exp(inf - inf)), and `s < 1` is false for NaN: the denominator is then NaN, as on the
    # other faces (tl.maximum(s, 1) would drop it).
    return tl.where(m == float("-inf"), float("-inf"), m + tl.log(tl.where(s < 1.0, 1.0, s)))


@triton.jit
def _finite(x):
    """x with non-finite entries set to 0. Backward recomputes activations of every cell of a tile,
    including cells of a sequence whose cost is NaN and cells off the lattice: their d logits are 0, and
    0 * NaN must not reach a gradient shared by the batch (weight, bias)."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _pick(tile, cols, col):
    """tile[r, col[r]] for each row r whose col lies in this block of columns, else 0."""
    return tl.sum(tl.where(cols[None, :] == col[:, None], tile, 0.0), 1)


@triton.jit
def _label(targets_ptr, b, u, labels, U, V, live):
    """y_{u+1} for cells with an outgoing label arc (u < U_b), clamped into [0, V) as the reference
    does; -1 (matches no column) elsewhere. Padding past target_lengths is never read."""
    has = live & (u < labels)
    y = tl.load(targets_ptr + b * U + u, mask=has, other=0)
    return tl.where(has, tl.minimum(tl.maximum(y, 0), V - 1), -1)


@triton.jit
def _rows(frames_ptr, labels_ptr, n_rows, T, U1, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R flat lattice rows r = (b*T + t)*(U+1) + u and whether each is on it."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = row < n_rows
    b = row // (T * U1)
    t = row // U1 % T
    u = row % U1
    frames = tl.load(frames_ptr + b, mask=in_range, other=0)
    labels = tl.load(labels_ptr + b, mask=in_range, other=0)
    return row.to(tl.int64), b, t, u, frames, labels, in_range, (t < frames) & (u <= labels)


@triton.jit
def _arc_weights(alphas_ptr, betas_ptr, den_ptr, row, t, u, frames, labels, live, T, U1):
    """What a cell's logit gradient needs, from the saved lattice (see the reference's _arc_posteriors):
    occupancy = exp(alpha + beta - log P) (multiplies softmax), and log weights w_blank, w_y such that
    gamma_blank = exp(z[blank] - den + w_blank), gamma_y = exp(z[y] - den + w_y) for the raw logits z.
    ok: the cell is on the lattice and its sequence has a finite log P = beta(0, 0)."""
    log_p = tl.load(betas_ptr + row - row % (T * U1), mask=live, other=0.0)  # beta(0, 0) of the sequence
    ok = live & (tl.abs(log_p) < float("inf"))
    log_p = tl.where(ok, log_p, 0.0)
    alpha = tl.load(alphas_ptr + row, mask=ok, other=float("-inf"))
    beta = tl.load(betas_ptr + row, mask=ok, other=float("-inf"))
    den = tl.load(den_ptr + row, mask=ok, other=0.0)
    after_blank = tl.load(betas_ptr + row + U1, mask=ok & (t + 1 < frames), other=float("-inf"))
    after_blank = tl.where((t == frames - 1) & (u == labels), 0.0, after_blank)  # the final blank
    after_label = tl.load(betas_ptr + row + 1, mask=ok & (u < labels), other=float("-inf"))
    occupancy = tl.where(ok, tl.exp(alpha + beta - log_p), 0.0)
    w_blank = tl.where(ok, alpha - log_p + after_blank, float("-inf"))
    w_y = tl.where(ok, alpha - log_p + after_label, float("-inf"))
    return den, occupancy, w_blank, w_y, ok


@triton.jit
def _logit_grad(z, cols, den, occupancy, w_blank, w_y, blank, label, clamp, scale, ok):
    """d cost / d z for a (R, C) tile of raw logits (-inf in padded columns): clamped to [-clamp, clamp]
    when clamp > 0, then times scale (grad_costs[b]); exactly 0 in rows that are not ok."""
    # z - den first, as the reference forms the log-probs: both may be large (logits of 1e4).
    g_blank = tl.exp(_pick(z, cols, tl.zeros_like(label) + blank) - den + w_blank)
    g_y = tl.exp(_pick(z, cols, label) - den + w_y)
    # occupancy is 0 without log-softmax (and off the lattice): never form 0 * exp(large).
    soft = tl.where(occupancy[:, None] > 0, occupancy[:, None] * tl.exp(z - den[:, None]), 0.0)
    g = soft - tl.where(cols[None, :] == blank, g_blank[:, None], 0.0)
    g = g - tl.where(cols[None, :] == label[:, None], g_y[:, None], 0.0)
    g = tl.where(clamp > 0, tl.minimum(tl.maximum(g, -clamp), clamp), g)
    return tl.where(ok[:, None], g * scale[:, None], 0.0)


# ---------------------------------------------------------------------------------------------------
# rnnt_loss kernels


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, frames_ptr, labels_ptr, den_ptr, lp_blank_ptr, lp_y_ptr,
                      n_rows, T, U, V, blank, fused, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    row, b, _, u, _, labels, _, live = _rows(frames_ptr, labels_ptr, n_rows, T, U + 1, BLOCK_R)
    label = _label(targets_ptr, b, u, labels, U, V, live)
    z_blank = _acc(tl.load(logits_ptr + row * V + blank, mask=live, other=0.0))
    z_y = _acc(tl.load(logits_ptr + row * V + label, mask=label >= 0, other=0.0))
    m = tl.full((BLOCK_R,), float("-inf"), z_blank.dtype)
    s = tl.zeros((BLOCK_R,), z_blank.dtype)
    # No pass over V at all when every row is off the lattice, or without log-softmax (den = 0).
    n_blocks = tl.where((tl.max(live.to(tl.int32)) > 0) & (fused != 0), tl.cdiv(V, BLOCK_V), 0)
    for block in range(n_blocks):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + row[:, None] * V + cols[None, :], mask=live[:, None] & (cols[None, :] < V),
                    other=float("-inf"))
        m, s = _lse_update(m, s, _acc(z))
    den = tl.where(fused != 0, _lse_finish(m, s), 0.0)
    tl.store(den_ptr + row, den, mask=live)
    tl.store(lp_blank_ptr + row, z_blank - den, mask=live)
    tl.store(lp_y_ptr + row, z_y - den, mask=live)


@triton.jit
def _lattice_kernel(lp_blank_ptr, lp_y_ptr, frames_ptr, labels_ptr, alphas_ptr, betas_ptr, costs_ptr, T, U1,
                    BLOCK_U: tl.constexpr):
    b = tl.program_id(0)
    is_beta = tl.program_id(1) == 1
    frames = tl.load(frames_ptr + b)
    labels = tl.load(labels_ptr + b)
    base = b.to(tl.int64) * T * U1
    lane = tl.arange(0, BLOCK_U)
    live = lane <= labels
    # alpha runs u upwards from 0, beta downwards from U_b: then both start at lane 0 and the same
    # scan serves both. The label arc into lane j leaves lane j-1: label position u-1 (alpha) or u (beta).
    u = tl.where(is_beta, labels - lane, lane)
    u_label = tl.where(is_beta, u, u - 1)
    # The row "before" the first: every path starts in lane 0 with log-prob 0 (for beta, the final
    # blank's lp_blank(T_b-1, U_b) is then added as the blank arc of the first row).
    x = tl.where(lane == 0, 0.0, float("-inf")).to(costs_ptr.dtype.element_ty)
    for i in range(frames):
        t = tl.where(is_beta, frames - 1 - i, i)
        # The blank arc between rows t-1 and t (alpha) or t and t+1 (beta) is read at the earlier row.
        t_blank = tl.where(is_beta, t, t - 1)
        lp_blank = tl.load(lp_blank_ptr + base + t_blank * U1 + u, mask=live & (t_blank >= 0), other=0.0)
        lp_y = tl.load(lp_y_ptr + base + t * U1 + u_label, mask=live & (lane > 0), other=float("-inf"))
        x, _ = tl.associative_scan((x + lp_blank, lp_y), 0, _then)
        tl.store(alphas_ptr + base + t * U1 + u, x, mask=live & ~is_beta)
        tl.store(betas_ptr + base + t * U1 + u, x, mask=live & is_beta)
    # log P = alpha(T_b-1, U_b) + lp_blank(T_b-1, U_b) (beta's lane U_b now holds beta(0, 0), the same).
    last = tl.sum(tl.where(lane == labels, x, 0.0))
    final_blank = tl.load(lp_blank_ptr + base + (frames - 1) * U1 + labels)
    tl.store(costs_ptr + b, -(last + final_blank), mask=~is_beta)


@triton.jit
def _rnnt_grad_kernel(grad_costs_ptr, logits_ptr, targets_ptr, frames_ptr, labels_ptr, alphas_ptr, betas_ptr,
                      den_ptr, grad_ptr, clamp_ptr, n_rows, T, U, V, blank, fused,
                      BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    row, b, t, u, frames, labels, in_range, live = _rows(frames_ptr, labels_ptr, n_rows, T, U + 1, BLOCK_R)
    label = _label(targets_ptr, b, u, labels, U, V, live)
    den, occupancy, w_blank, w_y, ok = _arc_weights(alphas_ptr, betas_ptr, den_ptr, row, t, u, frames,
                                                     labels, live, T, U + 1)
    occupancy = tl.where(fused != 0, occupancy, 0.0)  # without log-softmax only blank and y get a gradient
    # (A masked load with `other` here breaks Triton 3.6's layout pass for fp64; rows that are not ok
    # get no gradient whatever their scale.)
    scale = _acc(tl.load(grad_costs_ptr + b, mask=in_range))
    clamp = tl.load(clamp_ptr)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        offsets = row[:, None] * V + cols[None, :]
        z = _acc(tl.load(logits_ptr + offsets, mask=ok[:, None] & (cols[None, :] < V), other=float("-inf")))
        g = _logit_grad(z, cols, den, occupancy, w_blank, w_y, blank, label, clamp, scale, ok)
        tl.store(grad_ptr + offsets, _cast(g, grad_ptr.dtype.element_ty),
                 mask=in_range[:, None] & (cols[None, :] < V))


# ---------------------------------------------------------------------------------------------------
# fused joint kernels


@triton.jit
def _dot(a, b, operand_dtype: tl.constexpr):
    """a @ b with both operands in operand_dtype (the input dtype), float32 (float64) accumulation,
    and IEEE fp32, not TF32, for float32 operands."""
    if _INTERPRETED and operand_dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(operand_dtype), b.to(operand_dtype), input_precision="ieee")


@triton.jit
def _hidden(enc_ptr, pred_ptr, enc_rows, pred_rows, t_live, u_live, ks, H, ACT: tl.constexpr):
    """act(enc[b, t] + pred[b, u]) for a tile's BLOCK_T x BLOCK_U cells (flattened, t-major) x hidden
    units ks, in the accumulation dtype. Loads one (BLOCK_T, BLOCK_K) and one (BLOCK_U, BLOCK_K) tile
    and broadcasts, rather than gathering per cell. Rows past T_b or U_b read 0."""
    in_h = ks[None, :] < H
    enc = tl.load(enc_ptr + enc_rows[:, None] * H + ks[None, :], mask=t_live[:, None] & in_h, other=0.0)
    pred = tl.load(pred_ptr + pred_rows[:, None] * H + ks[None, :], mask=u_live[:, None] & in_h, other=0.0)
    a = _acc(enc)[:, None, :] + _acc(pred)[None, :, :]
    a = tl.reshape(a, (enc_rows.shape[0] * pred_rows.shape[0], ks.shape[0]))
    if ACT == 0:  # tanh, from exp (portable across Triton versions and the interpreter)
        e = tl.exp(-2.0 * tl.abs(a))
        magnitude = (1.0 - e) / (1.0 + e)
        return tl.where(a < 0, -magnitude, magnitude)
    elif ACT == 1:
        return tl.maximum(a, 0.0)
    else:
        return a


@triton.jit
def _joint_logits(enc_ptr, pred_ptr, weight_ptr, bias_ptr, enc_rows, pred_rows, t_live, u_live, cols, H, V,
                  ACT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (cells, BLOCK_V) tile of logits act(enc + pred) @ weight[cols].T + bias[cols]; -inf in
    columns past V."""
    bias = _acc(tl.load(bias_ptr + cols, mask=cols < V, other=0.0))
    logits = tl.zeros((enc_rows.shape[0] * pred_rows.shape[0], cols.shape[0]), bias.dtype) + bias[None, :]
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        z = _hidden(enc_ptr, pred_ptr, enc_rows, pred_rows, t_live, u_live, ks, H, ACT)
        w_t = tl.load(weight_ptr + cols[None, :] * H + ks[:, None],
                      mask=(cols[None, :] < V) & (ks[:, None] < H), other=0.0)
        logits += _dot(z, w_t, weight_ptr.dtype.element_ty)
    return tl.where(cols[None, :] < V, logits, float("-inf"))


@triton.jit
def _tile(tile, frames_ptr, labels_ptr, T, U1, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """Cell tile number `tile`, numbered sequence-major, then frame blocks, then label blocks: its
    sequence b, first frame t0 and label position u0, the sequence's lengths, and whether any of its
    BLOCK_T x BLOCK_U cells is on the lattice."""
    t_tiles = tl.cdiv(T, BLOCK_T)
    u_tiles = tl.cdiv(U1, BLOCK_U)
    b = tile // (t_tiles * u_tiles)
    t0 = tile // u_tiles % t_tiles * BLOCK_T
    u0 = tile % u_tiles * BLOCK_U
    frames = tl.load(frames_ptr + b)
    labels = tl.load(labels_ptr + b)
    return b, t0, u0, frames, labels, (t0 < frames) & (u0 <= labels)


@triton.jit
def _tile_inputs(b, t0, u0, frames, labels, T, U1, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """The tile's rows of enc (one per frame) and of pred (one per label position), and whether each
    lies within the sequence's lengths."""
    tile_t = t0 + tl.arange(0, BLOCK_T)
    tile_u = u0 + tl.arange(0, BLOCK_U)
    return b.to(tl.int64) * T + tile_t, b.to(tl.int64) * U1 + tile_u, tile_t < frames, tile_u <= labels


@triton.jit
def _tile_cells(b, t0, u0, frames, labels, T, U1, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """Per cell of the tile (flattened, t-major): t, u, whether it is on the lattice, its lattice row."""
    cell = tl.arange(0, BLOCK_T * BLOCK_U)
    t = t0 + cell // BLOCK_U
    u = u0 + cell % BLOCK_U
    return t, u, (t < frames) & (u <= labels), (b.to(tl.int64) * T + t) * U1 + u


@triton.jit
def _joint_forward_kernel(enc_ptr, pred_ptr, weight_ptr, bias_ptr, targets_ptr, frames_ptr, labels_ptr,
                          den_ptr, lp_blank_ptr, lp_y_ptr, T, U, H, V, blank, ACT: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    b, t0, u0, frames, labels, tile_live = _tile(tl.program_id(0), frames_ptr, labels_ptr, T, U + 1,
                                                 BLOCK_T, BLOCK_U)
    enc_rows, pred_rows, t_live, u_live = _tile_inputs(b, t0, u0, frames, labels, T, U + 1, BLOCK_T, BLOCK_U)
    _, u, live, row = _tile_cells(b, t0, u0, frames, labels, T, U + 1, BLOCK_T, BLOCK_U)
    label = _label(targets_ptr, b, u, labels, U, V, live)
    m = tl.full((BLOCK_T * BLOCK_U,), float("-inf"), den_ptr.dtype.element_ty)
    s = tl.zeros((BLOCK_T * BLOCK_U,), den_ptr.dtype.element_ty)
    z_blank = tl.zeros((BLOCK_T * BLOCK_U,), den_ptr.dtype.element_ty)
    z_y = tl.zeros((BLOCK_T * BLOCK_U,), den_ptr.dtype.element_ty)
    for block in range(tl.where(tile_live, tl.cdiv(V, BLOCK_V), 0)):  # no work off the lattice
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _joint_logits(enc_ptr, pred_ptr, weight_ptr, bias_ptr, enc_rows, pred_rows, t_live, u_live, cols,
                          H, V, ACT, BLOCK_K)
        m, s = _lse_update(m, s, z)
        z_blank += _pick(z, cols, tl.zeros_like(label) + blank)
        z_y += _pick(z, cols, label)
    den = _lse_finish(m, s)
    tl.store(den_ptr + row, den, mask=live)
    tl.store(lp_blank_ptr + row, z_blank - den, mask=live)
    tl.store(lp_y_ptr + row, z_y - den, mask=live)


# The joint's backward runs over chunks of cell tiles (fused_joint_rnnt_loss_backward): per chunk,
# 1. _joint_dlogits_kernel recomputes each tile's logits and writes its d logits (tile, cell, V) to the
#    chunk buffer, and adds to grad_bias (atomics: one V-vector per tile);
# 2. _joint_dweight_kernel: grad_weight += d logits^T act(enc + pred), a GEMM whose reduction runs over
#    the chunk's cells, each (BLOCK_V, BLOCK_K) block of grad_weight accumulated in registers;
# 3. _joint_dhidden_kernel: d act = d logits @ weight (reduced over V in registers), times act', summed
#    over u into grad_enc and over t into grad_pred (atomics: BLOCK_T + BLOCK_U rows per tile).
# Tiles off the lattice are skipped by all three.


@triton.jit
def _joint_dlogits_kernel(grad_costs_ptr, enc_ptr, pred_ptr, weight_ptr, bias_ptr, targets_ptr, frames_ptr,
                          labels_ptr, alphas_ptr, betas_ptr, den_ptr, clamp_ptr, dlogits_ptr, grad_bias_ptr,
                          first_tile, T, U, H, V, blank, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    b, t0, u0, frames, labels, tile_live = _tile(first_tile + tl.program_id(0), frames_ptr, labels_ptr, T,
                                                 U + 1, BLOCK_T, BLOCK_U)
    enc_rows, pred_rows, t_live, u_live = _tile_inputs(b, t0, u0, frames, labels, T, U + 1, BLOCK_T, BLOCK_U)
    t, u, live, row = _tile_cells(b, t0, u0, frames, labels, T, U + 1, BLOCK_T, BLOCK_U)
    label = _label(targets_ptr, b, u, labels, U, V, live)
    den, occupancy, w_blank, w_y, ok = _arc_weights(alphas_ptr, betas_ptr, den_ptr, row, t, u, frames, labels,
                                                     live, T, U + 1)
    scale = tl.zeros_like(den) + _acc(tl.load(grad_costs_ptr + b))
    clamp = tl.load(clamp_ptr)
    cells = tl.program_id(0).to(tl.int64) * BLOCK_T * BLOCK_U + tl.arange(0, BLOCK_T * BLOCK_U)
    for block in range(tl.where(tile_live, tl.cdiv(V, BLOCK_V), 0)):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _joint_logits(enc_ptr, pred_ptr, weight_ptr, bias_ptr, enc_rows, pred_rows, t_live, u_live, cols,
                          H, V, ACT, BLOCK_K)
        d_logits = _logit_grad(z, cols, den, occupancy, w_blank, w_y, blank, label, clamp, scale, ok)
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(d_logits, 0), mask=cols < V)
        tl.store(dlogits_ptr + cells[:, None] * V + cols[None, :], _cast(d_logits, dlogits_ptr.dtype.element_ty),
                 mask=cols[None, :] < V)


@triton.jit
def _joint_dweight_kernel(dlogits_ptr, enc_ptr, pred_ptr, frames_ptr, labels_ptr, grad_weight_ptr, first_tile,
                          n_tiles, T, U, H, V, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (H blocks, V blocks, splits): the programs that run together read the same d logits. Axis 2
    # splits the chunk's tiles between programs, so that there are enough of them to fill a GPU.
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cell = tl.arange(0, BLOCK_T * BLOCK_U)
    acc = tl.zeros((BLOCK_V, BLOCK_K), grad_weight_ptr.dtype.element_ty)
    for i in range(tl.program_id(2), n_tiles, tl.num_programs(2)):
        b, t0, u0, frames, labels, tile_live = _tile(first_tile + i, frames_ptr, labels_ptr, T, U + 1,
                                                     BLOCK_T, BLOCK_U)
        if tile_live:
            enc_rows, pred_rows, t_live, u_live = _tile_inputs(b, t0, u0, frames, labels, T, U + 1,
                                                               BLOCK_T, BLOCK_U)
            hidden = _finite(_hidden(enc_ptr, pred_ptr, enc_rows, pred_rows, t_live, u_live, ks, H, ACT))
            cells = (i * BLOCK_T * BLOCK_U + cell).to(tl.int64)
            d_logits = tl.load(dlogits_ptr + cells[:, None] * V + cols[None, :], mask=cols[None, :] < V,
                               other=0.0)
            acc += _dot(tl.trans(d_logits), hidden, dlogits_ptr.dtype.element_ty)
    tl.atomic_add(grad_weight_ptr + cols[:, None] * H + ks[None, :], acc,
                  mask=(cols[:, None] < V) & (ks[None, :] < H))


@triton.jit
def _joint_dhidden_kernel(dlogits_ptr, enc_ptr, pred_ptr, weight_ptr, frames_ptr, labels_ptr, grad_enc_ptr,
                          grad_pred_ptr, first_tile, T, U, H, V, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (H blocks, tiles): the programs that run together read the same tile of d logits.
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    b, t0, u0, frames, labels, tile_live = _tile(first_tile + tl.program_id(1), frames_ptr, labels_ptr, T,
                                                 U + 1, BLOCK_T, BLOCK_U)
    enc_rows, pred_rows, t_live, u_live = _tile_inputs(b, t0, u0, frames, labels, T, U + 1, BLOCK_T, BLOCK_U)
    cells = tl.program_id(1).to(tl.int64) * BLOCK_T * BLOCK_U + tl.arange(0, BLOCK_T * BLOCK_U)
    d_hidden = tl.zeros((BLOCK_T * BLOCK_U, BLOCK_K), grad_enc_ptr.dtype.element_ty)
    for block in range(tl.where(tile_live, tl.cdiv(V, BLOCK_V), 0)):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        d_logits = tl.load(dlogits_ptr + cells[:, None] * V + cols[None, :], mask=cols[None, :] < V,
                           other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * H + ks[None, :],
                    mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
        d_hidden += _dot(d_logits, w, dlogits_ptr.dtype.element_ty)
    if ACT != 2:  # act' from act(a) itself: 1 - tanh^2, or relu's step
        hidden = _finite(_hidden(enc_ptr, pred_ptr, enc_rows, pred_rows, t_live, u_live, ks, H, ACT))
        d_hidden = d_hidden * (1.0 - hidden * hidden) if ACT == 0 else tl.where(hidden > 0, d_hidden, 0.0)
    # Cells off the lattice have d logits = 0, so they add nothing to these sums.
    d_hidden = tl.reshape(d_hidden, (BLOCK_T, BLOCK_U, BLOCK_K))
    h_live = (ks[None, :] < H) & tile_live
    tl.atomic_add(grad_enc_ptr + enc_rows[:, None] * H + ks[None, :], tl.sum(d_hidden, 1),
                  mask=t_live[:, None] & h_live)
    tl.atomic_add(grad_pred_ptr + pred_rows[:, None] * H + ks[None, :], tl.sum(d_hidden, 0),
                  mask=u_live[:, None] & h_live)


# ---------------------------------------------------------------------------------------------------
# launch configurations: the launchers pick from these tables, and AOT_CONFIGS lists all of them.


@dataclass(frozen=True)
class _Config:
    """One way to launch a kernel: its constexprs, warps and pipeline stages."""

    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def label(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.constexprs.items()]
                        + [f"warps={self.num_warps}", f"stages={self.num_stages}"])


# Row kernels: 2048-element tiles (8 per thread), wide in V for large vocabularies, tall in rows for small.
_ROW_CONFIGS = [_Config({"BLOCK_R": 2048 // v, "BLOCK_V": v}, num_warps=8) for v in (32, 128, 512, 2048)]
# Lattice: one block holds a frame's U+1 cells; more warps for wider blocks.
_LATTICE_CONFIGS = [_Config({"BLOCK_U": u}, num_warps=w)
                    for u, w in ((32, 1), (256, 2), (1024, 4), (4096, 16))]
MAX_LABELS_PLUS_1 = _LATTICE_CONFIGS[-1].constexprs["BLOCK_U"]
# Joint: tiles of 8 x 8 cells in every kernel (the d logits chunk is laid out by them). Per kernel and
# dtype kind, (BLOCK_V, BLOCK_K, num_warps, num_stages). "mma": fp16/bf16 on tensor cores. "fp32"
# (IEEE) and "fp64" run tl.dot on FMA units, which hold whole operand rows in registers: narrower V
# blocks and mostly no software pipelining. The logits kernels keep K narrow (their live set is a
# cells x V tile of logits and its softmax); the two GEMMs of the backward have wide output tiles.
# tl.dot needs every dimension >= 16. Not tuned: the H200 run (benchmarks/results/nvidia-h200.md) only
# timed them. Each entry is one that ptxas compiles without spills under both Triton 3.6 and 3.8 (its
# register heuristics spill a few bytes at 8 warps for some fp32/fp64 tiles that fit easily at 4, and
# vice versa).
_JOINT_CELLS = {"BLOCK_T": 8, "BLOCK_U": 8}
_JOINT_BLOCKS = {
    _joint_forward_kernel: {"mma": (64, 16, 8, 2), "fp32": (32, 16, 4, 1), "fp64": (32, 16, 8, 1)},
    _joint_dlogits_kernel: {"mma": (64, 16, 8, 2), "fp32": (32, 16, 4, 1), "fp64": (16, 16, 4, 1)},
    _joint_dweight_kernel: {"mma": (64, 64, 8, 2), "fp32": (32, 32, 8, 2), "fp64": (16, 32, 8, 1)},
    _joint_dhidden_kernel: {"mma": (64, 64, 8, 2), "fp32": (32, 32, 8, 2), "fp64": (32, 32, 8, 2)},
}
_JOINT_KINDS = {torch.float16: "mma", torch.bfloat16: "mma", torch.float32: "fp32", torch.float64: "fp64"}
# The chunk of d logits the joint's backward keeps at once (bytes); at least one tile.
DLOGITS_CHUNK_BYTES = 64 << 20
# Enough programs to fill a large GPU, for _joint_dweight_kernel's split of a chunk.
_PROGRAMS_TO_FILL = 528


def _row_config(vocab: int) -> _Config:
    return next((c for c in _ROW_CONFIGS if c.constexprs["BLOCK_V"] >= vocab), _ROW_CONFIGS[-1])


def _lattice_config(labels_plus_1: int) -> _Config:
    for config in _LATTICE_CONFIGS:
        if config.constexprs["BLOCK_U"] >= labels_plus_1:
            return config
    raise ValueError(f"the Triton rnnt_loss face handles U+1 <= {MAX_LABELS_PLUS_1} label positions; got "
                     f"U+1 = {labels_plus_1} (use the reference face, or split the targets)")


def _launch(kernel, grid, config: _Config, *args):
    """The one place kernels are launched: a config's constexprs and warps, positional runtime args."""
    with launch_turn():
        kernel[grid](*args, **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------------
# faces


def _check_sizes(batch, frames, labels_plus_1, weight=None) -> _Config:
    """Refuse what the kernels' int32 indexing or one-block lattice cannot hold; the lattice config."""
    if batch * frames * labels_plus_1 >= 2 ** 31:
        raise ValueError(f"the Triton rnnt faces handle fewer than 2**31 lattice cells; got B*T*(U+1) = "
                         f"{batch * frames * labels_plus_1}")
    if weight is not None and weight.numel() >= 2 ** 31:
        raise ValueError("the Triton fused_joint_rnnt_loss face handles weights of fewer than 2**31 "
                         f"elements; got V*H = {weight.numel()}")
    return _lattice_config(labels_plus_1)


def _scalar(value: float, like):
    # Triton passes a Python float as float32; a float64 face needs clamp in float64.
    return torch.full((1,), value, dtype=like.dtype, device=like.device)


def _lattice(lp_blank, lp_y, logit_lengths, target_lengths, den, save, config):
    """Costs (accumulation dtype) and, with save, the (alphas, betas, den) workspace."""
    batch, frames, labels_plus_1 = lp_blank.shape
    alphas = torch.full_like(lp_blank, float("-inf")) if save else torch.empty_like(lp_blank)  # else scratch
    betas = torch.full_like(lp_blank, float("-inf")) if save else lp_blank.new_empty(0)
    costs = lp_blank.new_empty(batch)
    _launch(_lattice_kernel, (batch, 2 if save else 1), config, lp_blank, lp_y, logit_lengths, target_lengths,
            alphas, betas, costs, frames, labels_plus_1)
    if not save:
        return costs, *(lp_blank.new_empty(0) for _ in range(3))
    return costs, alphas, betas, den


def rnnt_loss_forward(logits, targets, logit_lengths, target_lengths, blank: int, clamp: float,
                      fused_log_softmax: bool, save: bool):
    batch, frames, labels_plus_1, vocab = logits.shape
    lattice_config = _check_sizes(batch, frames, labels_plus_1)
    acc = acc_dtype(logits.dtype)
    den = torch.zeros(batch, frames, labels_plus_1, dtype=acc, device=logits.device)
    lp_blank, lp_y = torch.empty_like(den), torch.empty_like(den)
    n_rows = den.numel()
    config = _row_config(vocab)
    _launch(_row_stats_kernel, (triton.cdiv(n_rows, config.constexprs["BLOCK_R"]),), config, logits,
            targets, logit_lengths, target_lengths, den, lp_blank, lp_y, n_rows, frames, labels_plus_1 - 1,
            vocab, blank, int(fused_log_softmax))
    costs, *workspace = _lattice(lp_blank, lp_y, logit_lengths, target_lengths, den, save, lattice_config)
    return costs.to(logits.dtype), *workspace


def rnnt_loss_backward(grad_costs, logits, targets, logit_lengths, target_lengths, costs, alphas, betas, den,
                       blank: int, clamp: float, fused_log_softmax: bool):
    batch, frames, labels_plus_1, vocab = logits.shape
    _check_sizes(batch, frames, labels_plus_1)
    grad = torch.empty_like(logits)
    n_rows = batch * frames * labels_plus_1
    config = _row_config(vocab)
    _launch(_rnnt_grad_kernel, (triton.cdiv(n_rows, config.constexprs["BLOCK_R"]),), config, grad_costs,
            logits, targets, logit_lengths, target_lengths, alphas, betas, den, grad, _scalar(clamp, den),
            n_rows, frames, labels_plus_1 - 1, vocab, blank, int(fused_log_softmax))
    return grad


def _joint_config(kernel, kind: str, act: int) -> _Config:
    block_v, block_k, warps, stages = _JOINT_BLOCKS[kernel][kind]
    return _Config({**_JOINT_CELLS, "BLOCK_V": block_v, "BLOCK_K": block_k, "ACT": act}, warps, stages)


def _joint_configs(dtype, activation) -> dict:
    """{kernel: config} for inputs of `dtype` and this activation."""
    kind, act = _JOINT_KINDS[dtype], ACTIVATIONS[activation]
    return {kernel: _joint_config(kernel, kind, act) for kernel in _JOINT_BLOCKS}


def _joint_tiles(batch, frames, labels_plus_1):
    cells = _JOINT_CELLS
    return batch * triton.cdiv(frames, cells["BLOCK_T"]) * triton.cdiv(labels_plus_1, cells["BLOCK_U"])


def _bias_or_zeros(bias, weight):
    # A zero bias costs V loads and saves a HAS_BIAS variant of every kernel.
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


def fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank: int,
                                  activation: str, clamp: float, save: bool):
    (batch, frames, hidden), labels_plus_1, vocab = enc.shape, pred.shape[1], weight.shape[0]
    lattice_config = _check_sizes(batch, frames, labels_plus_1, weight)
    den = torch.zeros(batch, frames, labels_plus_1, dtype=acc_dtype(enc.dtype), device=enc.device)
    lp_blank, lp_y = torch.empty_like(den), torch.empty_like(den)
    config = _joint_configs(enc.dtype, activation)[_joint_forward_kernel]
    _launch(_joint_forward_kernel, (_joint_tiles(batch, frames, labels_plus_1),), config, enc, pred, weight,
            _bias_or_zeros(bias, weight), targets, logit_lengths, target_lengths, den, lp_blank, lp_y, frames,
            labels_plus_1 - 1, hidden, vocab, blank)
    costs, *workspace = _lattice(lp_blank, lp_y, logit_lengths, target_lengths, den, save, lattice_config)
    return costs.to(enc.dtype), *workspace


def fused_joint_rnnt_loss_backward(grad_costs, enc, pred, weight, bias, targets, logit_lengths,
                                   target_lengths, costs, alphas, betas, den, blank: int, activation: str,
                                   clamp: float):
    (batch, frames, hidden), labels_plus_1, vocab = enc.shape, pred.shape[1], weight.shape[0]
    _check_sizes(batch, frames, labels_plus_1, weight)
    acc = acc_dtype(enc.dtype)
    shapes = (enc.shape, pred.shape, weight.shape, (vocab,))
    grad_enc, grad_pred, grad_weight, grad_bias = (enc.new_zeros(x, dtype=acc) for x in shapes)
    configs = _joint_configs(enc.dtype, activation)
    n_tiles = _joint_tiles(batch, frames, labels_plus_1)
    cells = _JOINT_CELLS["BLOCK_T"] * _JOINT_CELLS["BLOCK_U"]
    # The chunk's tiles are _joint_dhidden_kernel's grid axis 1, which CUDA caps at 65535.
    chunk = max(1, min(n_tiles, 65535, DLOGITS_CHUNK_BYTES // (cells * vocab * enc.element_size())))
    dlogits = torch.empty(chunk * cells * vocab, dtype=enc.dtype, device=enc.device)
    sizes = (frames, labels_plus_1 - 1, hidden, vocab)

    def blocks(kernel, name, n):
        return triton.cdiv(n, configs[kernel].constexprs[name])

    dweight_grid = (blocks(_joint_dweight_kernel, "BLOCK_K", hidden),
                    blocks(_joint_dweight_kernel, "BLOCK_V", vocab))
    dhidden_blocks = blocks(_joint_dhidden_kernel, "BLOCK_K", hidden)
    lengths = (logit_lengths, target_lengths)
    for first in range(0, n_tiles, chunk):
        count = min(chunk, n_tiles - first)
        _launch(_joint_dlogits_kernel, (count,), configs[_joint_dlogits_kernel], grad_costs, enc, pred,
                weight, _bias_or_zeros(bias, weight), targets, *lengths, alphas, betas, den,
                _scalar(clamp, den), dlogits, grad_bias, first, *sizes, blank)
        splits = max(1, min(count, _PROGRAMS_TO_FILL // (dweight_grid[0] * dweight_grid[1])))
        _launch(_joint_dweight_kernel, (*dweight_grid, splits), configs[_joint_dweight_kernel], dlogits, enc,
                pred, *lengths, grad_weight, first, count, *sizes)
        _launch(_joint_dhidden_kernel, (dhidden_blocks, count), configs[_joint_dhidden_kernel], dlogits, enc,
                pred, weight, *lengths, grad_enc, grad_pred, first, *sizes)
    return (grad_enc.to(enc.dtype), grad_pred.to(pred.dtype), grad_weight.to(weight.dtype),
            grad_bias.to(enc.dtype) if bias is not None else enc.new_empty(0))


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compile list (python -m amnets_kernels.aot)


# What each pointer argument points to, by name: input data, accumulation-dtype buffers, int32 labels.
_DATA = ("logits_ptr", "grad_costs_ptr", "grad_ptr", "enc_ptr", "pred_ptr", "weight_ptr", "bias_ptr",
         "dlogits_ptr")
_INT = ("targets_ptr", "frames_ptr", "labels_ptr")


def _signature(kernel, data: str) -> dict:
    """`kernel`'s AOT signature for `data` inputs: constexprs as annotated, pointers by name (the
    other buffers in the accumulation dtype), every other argument an i32."""
    acc = "fp64" if data == "fp64" else "fp32"
    signature = {}
    for p in inspect.signature(kernel.fn).parameters.values():
        if p.annotation is tl.constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + (data if p.name in _DATA else "i32" if p.name in _INT else acc)
        else:
            signature[p.name] = "i32"
    return signature


def _aot_configs():
    """Every launch configuration, each compiled for the input dtypes whose code differs: the row
    kernels load and store the input dtype; the lattice sees only the accumulation dtype; a joint
    kind is compiled for the dtype that selects it (fp16 shares bf16's code path)."""
    row = [(kernel, config, data) for kernel in (_row_stats_kernel, _rnnt_grad_kernel)
           for config in _ROW_CONFIGS for data in ("fp32", "bf16", "fp64")]
    lattice = [(_lattice_kernel, config, data) for config in _LATTICE_CONFIGS for data in ("fp32", "fp64")]
    joint = [(kernel, _joint_config(kernel, kind, act), {"mma": "bf16"}.get(kind, kind))
             for kind in ("mma", "fp32", "fp64") for kernel in _JOINT_BLOCKS for act in ACTIVATIONS.values()]
    return [AotConfig(f"rnnt.{kernel.fn.__name__.strip('_')}[{data},{config.label()}]", kernel,
                      _signature(kernel, data), dict(config.constexprs), config.num_warps, config.num_stages)
            for kernel, config, data in row + lattice + joint]


AOT_CONFIGS = _aot_configs()
