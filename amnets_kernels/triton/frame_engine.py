"""Triton face of the AmNets frame engine (the CPU face: csrc/cpu/frame_engine.cpp): one call runs a chunk
of streamed frames of an AmNetsEncoder (python/amnets/encoder.py) on the device, the arbitrator's decisions
included, with no host sync inside the chunk. On CUDA a chunk's launches are captured once as a CUDA
graph per (batch, frames, force) and replayed, so a call costs one graph launch of host time; a stream's state
stays in the buffers of the chunk it last ran (_Chunk, Stream), so its next call of that shape copies x in and
out, decisions out, and nothing else. A graph holds the kernels alone (a B=1 frame of a forced chunk: one
node per layer, two for low-rank; a fill or copy would be a node of its own).

Per frame t, on the device (decisions never leave it until the chunk returns):
  _arbitrator_kernel   decisions[:, t] = arbitrator([x_t | h_top]) > cut (a forced chunk's are filled before)
  per layer k:
    _project_kernel    (low-rank only) s = [V_ih x | V_hh h] for the rows the decision makes cheap
    _gates_kernel      partial gate sums, one program per (block row, split of the row's blocks, row tile):
                       the kept blocks for every row, the remaining blocks for the full rows only
                       (kept + rest = the dense weight), and for low-rank U s for the cheap rows.
                       The split over K gives a B=1 frame enough programs to fill the GPU.
                       The last of the 4 * split programs of a unit group (its four gates' lines) to finish
                       (an arrival count per group and row tile) then sums the splits' partials in split order,
                       adds the bias and runs the LSTM update; writes h, c (and out[:, t]). So a layer is one
                       launch (two for low-rank), with no kernel boundary between its products and its update
                       (`fused = False`: the update as its own _update_kernel launch, bit-equal results).
A row's branch only changes which blocks it multiplies, not the grid: a program whose rows are all cheap
skips the rest blocks (a loop bound of 0), so the full branch's weight traffic is paid once per frame for
the rows that want it, and not at all when none does.

Packing (once per weight version): each layer's [W_ih | W_hh] (4H, D + H) is re-tiled so that block row
g * Hp / b + j holds gate g of hidden units j*b .. j*b + b - 1 (Hp: H rounded up to the tile b), and split
into the kept BSR (the sparse branch's blocks, masked to its element mask; empty for low-rank) and the rest
BSR (the complement, every block for low-rank). A gate row's blocks are walked in order, so a result is
deterministic. h ping-pongs between two buffers (a layer reads every unit of its old h while writing the new
one); c is updated in place (a unit's update is the only reader and writer of its c).

Numbers: every load is widened to float32 at once (also what TRITON_INTERPRET=1 needs: its bf16 arithmetic is
wrong) and accumulated in float32; the gates, h, c, out and the arbitrator's hidden layer and logit are
rounded to the weights' dtype (fp32 or bf16) where the per-layer path rounds them, so the decisions are the
per-layer path's (fp32: equal in the tests; bf16: a logit at the threshold may round either way).
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
import weakref

import torch
import triton
import triton.language as tl

from .. import _backend, _C
from .._one_thread import OneThread
from ..aot import AotConfig
from ._common import cast as _cast
from ._common import launch_turn
from .lowrank_lstm import _cell_update

SPARSE_BLOCKS = (16, 32, 64)  # the sparse branch's block sizes the engine takes (as the CPU engine)
ROW_TILES = (1, 4, 16)  # rows per program: B=1 streams, a few, and tl.dot tiles from 16 rows
BLOCK_R = 16  # rank entries per step of the low-rank products
BLOCK_K = 64  # inputs per step of the arbitrator, and of the projection's tl.dot tiles
UPDATE_UNITS = 128  # hidden units per program of the LSTM update
GRAPHS_KEPT = 8  # CUDA graphs cached per engine (one per chunk shape seen; oldest dropped)


@triton.jit
def _f32(x):
    return x.to(tl.float32)


@triton.jit
def _rounded(x, like_ptr):
    """x as the per-layer path would hold it: rounded to the dtype `like_ptr` points to."""
    return _cast(x, like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _load_z(x_ptr, stride_x, h_ptr, stride_h, D, K, rows, row_ok, cols):
    """z[rows, cols] of z = [x | h] (D + H = K columns), 0 outside, as float32."""
    r = rows.to(tl.int64)[:, None]
    in_x = row_ok[:, None] & (cols < D)[None, :]
    in_h = row_ok[:, None] & ((cols >= D) & (cols < K))[None, :]
    zx = tl.load(x_ptr + r * stride_x + cols[None, :], mask=in_x, other=0.0)
    zh = tl.load(h_ptr + r * stride_h + (cols - D)[None, :], mask=in_h, other=0.0)
    return _f32(zx) + _f32(zh)


@triton.jit
def _mac(acc, a, w, USE_DOT: tl.constexpr):
    """acc (M, N) += a (M, J) @ w (N, J)^T."""
    if USE_DOT:
        return acc + tl.dot(a, tl.trans(w), input_precision="ieee")
    else:
        return acc + tl.sum(a[:, None, :] * w[None, :, :], axis=2)


# One row (a B=1 stream) does not take _mac's path a step at a time: the loops sum its products a (1, J) * w (N, J)
# into `wide` (N, J), in w's own layout, and over J once after the loop (_fold). A step's reduction cost w a trip
# through shared memory into the broadcast product's layout, a barrier and shuffle sums (sm_90 PTX of the b=32 gates
# kernel: 50 barriers and 320 shuffles; this way 5 and 12, the weight loads still 16 bytes wide).


@triton.jit
def _fold(acc, wide):
    """acc (1, N) + the row sums of wide (N, J)."""
    return acc + tl.sum(wide, axis=1)[None, :]


@triton.jit
def _walk(acc, values_ptr, crow_ptr, col_ptr, line, split, SPLIT, enabled, x_ptr, stride_x, h_ptr, stride_h,
          D, K, rows, rows_on, B: tl.constexpr, USE_DOT: tl.constexpr):
    """acc += z[rows_on] @ (this split's share of block row `line`)^T; nothing when not `enabled`."""
    start = tl.load(crow_ptr + line)
    n = tl.load(crow_ptr + line + 1) - start
    # the split's share in int32 (n * SPLIT < 2**31: FrameEngine checks), as an int64 loop index: e * B * B may
    # pass 2**31. (A 64-bit division is a subroutine call, around which ptxas spilled on sm_80.)
    lo = start.to(tl.int64) + n * split // SPLIT
    hi = start.to(tl.int64) + n * (split + 1) // SPLIT
    hi = tl.where(enabled, hi, lo)
    if USE_DOT:  # Triton pipelines this loop's loads (cp.async, num_stages)
        for e in range(lo, hi):
            z, w = _block(values_ptr, col_ptr, e, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B)
            acc = _mac(acc, z, w, USE_DOT)
    else:
        # Without tl.dot it does not (no cp.async in the PTX): each block would be one HBM round trip after the
        # other. So four blocks' loads are issued before the first is used.
        one_row: tl.constexpr = rows.shape[0] == 1
        wide = tl.zeros((B, B), dtype=tl.float32)
        for e in range(lo, hi, 4):
            z0, w0 = _block(values_ptr, col_ptr, e, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B)
            z1, w1 = _block(values_ptr, col_ptr, e + 1, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B)
            z2, w2 = _block(values_ptr, col_ptr, e + 2, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B)
            z3, w3 = _block(values_ptr, col_ptr, e + 3, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B)
            if one_row:
                wide += w0 * z0 + w1 * z1 + w2 * z2 + w3 * z3
            else:
                acc = _mac(_mac(_mac(_mac(acc, z0, w0, USE_DOT), z1, w1, USE_DOT), z2, w2, USE_DOT), z3, w3, USE_DOT)
        if one_row:
            acc = _fold(acc, wide)
    return acc


@triton.jit
def _block(values_ptr, col_ptr, e, hi, x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on, B: tl.constexpr):
    """Block e's inputs z (rows, B) and weights w (B, B) as float32; zeros where e >= hi."""
    o = tl.arange(0, B)
    ok = e < hi
    cols = tl.load(col_ptr + e, mask=ok, other=0) * B + o
    z = _load_z(x_ptr, stride_x, h_ptr, stride_h, D, K, rows, rows_on & ok, cols)
    w = _f32(tl.load(values_ptr + e * B * B + o[:, None] * B + o[None, :], mask=ok, other=0.0))
    return z, w


@triton.jit
def _gates_kernel(x_ptr, stride_x, h_ptr, stride_h, D, K, M, full_ptr, stride_full,
                  kept_ptr, kept_crow_ptr, kept_col_ptr, rest_ptr, rest_crow_ptr, rest_col_ptr,
                  u_ptr, s_ptr, R, part_ptr, NP, SPLIT,
                  FUSE, count_ptr, bias_ptr, c_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out, H, WRITE_OUT,
                  B: tl.constexpr, BLOCK_M: tl.constexpr, LOWRANK: tl.constexpr, RANK_STEP: tl.constexpr):
    """part[split, rows, line*B : line*B + B] = this split's share of the tiled gate rows of block row `line`;
    with FUSE, the last of the 4 * SPLIT programs of these rows' units j*B .. j*B + B - 1 (the four gates' lines,
    every split) to finish also runs their LSTM update, so a layer is one launch."""
    # grid (4 gates x SPLIT, row tiles, unit groups): the programs that meet in one arrival count (a unit group's
    # four gate lines, every split, one row tile) are neighbours, and so are a line's row tiles. (Read from the
    # grid's axes, the indices cost ptxas nothing to hold across the loops: from one axis, a division it kept in
    # local memory around them on sm_80.)
    split = tl.program_id(0) % SPLIT
    tile = tl.program_id(1)
    group = tl.program_id(2)
    line = tl.program_id(0) // SPLIT * (NP // (4 * B)) + group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    full = row_ok & (tl.load(full_ptr + rows * stride_full, mask=row_ok, other=0) != 0)
    n_full = tl.sum(full.to(tl.int32), 0)
    # low-rank: U s for the cheap rows (s is 0 in the full rows: _project_kernel's), its rank steps shared out
    # over the splits like the blocks (all in the first split, the cheap frame's gates took 10 us a layer at
    # B=1 on the H200, 2026-12-04 run4)
    rank_steps = R // RANK_STEP
    rank_lo = rank_steps * split // SPLIT * RANK_STEP
    rank_hi = tl.where(n_full < tl.sum(row_ok.to(tl.int32), 0), rank_steps * (split + 1) // SPLIT * RANK_STEP,
                       rank_lo)
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    acc = _walk(acc, kept_ptr, kept_crow_ptr, kept_col_ptr, line, split, SPLIT, True, x_ptr, stride_x, h_ptr,
                stride_h, D, K, rows, row_ok, B, USE_DOT)
    acc = _walk(acc, rest_ptr, rest_crow_ptr, rest_col_ptr, line, split, SPLIT, n_full > 0,
                x_ptr, stride_x, h_ptr, stride_h, D, K, rows, full, B, USE_DOT)
    o = line * B + tl.arange(0, B)
    if LOWRANK:
        wide = tl.zeros((B, RANK_STEP), dtype=tl.float32)
        for r0 in range(rank_lo, rank_hi, RANK_STEP):
            r = r0 + tl.arange(0, RANK_STEP)
            s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], mask=row_ok[:, None], other=0.0)
            u = _f32(tl.load(u_ptr + o.to(tl.int64)[:, None] * R + r[None, :]))
            if BLOCK_M == 1:
                wide += u * s
            else:
                acc = _mac(acc, s, u, USE_DOT)
        if BLOCK_M == 1:
            acc = _fold(acc, wide)
    out = part_ptr + (split * M + rows).to(tl.int64)[:, None] * NP + o[None, :]
    tl.store(out, acc, mask=row_ok[:, None])
    if FUSE != 0:
        counter = count_ptr + group * tl.num_programs(1) + tile
        tl.debug_barrier()  # every thread's partial stored before the count says so (release below)
        if tl.atomic_add(counter, 1, sem="acq_rel") == 4 * SPLIT - 1:
            tl.atomic_xchg(counter, 0)  # zero again for the next layer's launch
            _update(part_ptr, SPLIT, M, NP, bias_ptr, c_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out, H,
                    WRITE_OUT, rows, row_ok, group * B + tl.arange(0, B), SPLIT_STEP=min(8, 1024 // (BLOCK_M * B)))


@triton.jit
def _project_kernel(x_ptr, stride_x, D, h_ptr, stride_h, H, M, full_ptr, stride_full, v_ih_ptr, v_hh_ptr, R_IH,
                    s_ptr, R, BLOCK_M: tl.constexpr, RANK_STEP: tl.constexpr, STEP_K: tl.constexpr):
    """s[rows, r] = V_ih[r] . x (r < R_IH) or V_hh[r - R_IH] . h, for the cheap rows (0 for the others)."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    rows = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cheap = row_ok & (tl.load(full_ptr + rows * stride_full, mask=row_ok, other=1) == 0)
    first = (pid // m_tiles) * RANK_STEP
    r = first + tl.arange(0, RANK_STEP)
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    acc = tl.zeros((BLOCK_M, RANK_STEP), dtype=tl.float32)
    any_cheap = tl.max(cheap.to(tl.int32), 0) > 0
    if first < R_IH:
        acc = _project(acc, x_ptr, stride_x, D, v_ih_ptr, r, rows, cheap, any_cheap, STEP_K, USE_DOT)
    else:
        acc = _project(acc, h_ptr, stride_h, H, v_hh_ptr, r - R_IH, rows, cheap, any_cheap, STEP_K, USE_DOT)
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _project(acc, src_ptr, stride_src, N, v_ptr, r, rows, on, any_on, STEP_K: tl.constexpr, USE_DOT: tl.constexpr):
    n = tl.where(any_on, N, 0)
    one_row: tl.constexpr = rows.shape[0] == 1
    wide = tl.zeros((r.shape[0], STEP_K), dtype=tl.float32)
    for k0 in range(0, n, STEP_K):
        k = k0 + tl.arange(0, STEP_K)
        z = _f32(tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + k[None, :],
                         mask=on[:, None] & (k < N)[None, :], other=0.0))
        v = _f32(tl.load(v_ptr + r.to(tl.int64)[:, None] * N + k[None, :], mask=(k < N)[None, :], other=0.0))
        if one_row:
            wide += v * z
        else:
            acc = _mac(acc, z, v, USE_DOT)
    if one_row:
        acc = _fold(acc, wide)
    return acc


@triton.jit
def _update(part_ptr, SPLIT, M, NP, bias_ptr, c_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out, H, WRITE_OUT,
            rows, row_ok, units, SPLIT_STEP: tl.constexpr):
    """The LSTM update of rows x units (state rows H apart): gates = bias + the splits' partial sums, in split
    order (i, f, g, o at NP // 4 apart). The partials come from other programs: read past L1 (.cg), SPLIT_STEP
    splits' loads issued together (one after the other, a large split would be a chain of L2 round trips)."""
    u_ok = units < H
    ok = row_ok[:, None] & u_ok[None, :]
    zero = tl.where(ok, 0.0, 0.0)  # (rows, units) of float32
    gi = zero + _f32(tl.load(bias_ptr + units, mask=u_ok, other=0.0))[None, :]
    gf = zero + _f32(tl.load(bias_ptr + H + units, mask=u_ok, other=0.0))[None, :]
    gg = zero + _f32(tl.load(bias_ptr + 2 * H + units, mask=u_ok, other=0.0))[None, :]
    go = zero + _f32(tl.load(bias_ptr + 3 * H + units, mask=u_ok, other=0.0))[None, :]
    HP = NP // 4
    for first in range(0, SPLIT, SPLIT_STEP):
        for step in tl.static_range(SPLIT_STEP):
            on = ok & (first + step < SPLIT)
            p = part_ptr + ((first + step) * M + rows).to(tl.int64)[:, None] * NP + units[None, :]
            gi += tl.load(p, mask=on, other=0.0, cache_modifier=".cg")
            gf += tl.load(p + HP, mask=on, other=0.0, cache_modifier=".cg")
            gg += tl.load(p + 2 * HP, mask=on, other=0.0, cache_modifier=".cg")
            go += tl.load(p + 3 * HP, mask=on, other=0.0, cache_modifier=".cg")
    # the per-layer path rounds the gates to the weights' dtype (F.linear's output), then updates
    state = rows.to(tl.int64)[:, None] * H + units[None, :]
    c = _f32(tl.load(c_ptr + state, mask=ok, other=0.0))
    _, _, _, _, c, h = _cell_update(_rounded(gi, c_ptr), _rounded(gf, c_ptr), _rounded(gg, c_ptr),
                                    _rounded(go, c_ptr), c)
    tl.store(c_out_ptr + state, _cast(c, c_out_ptr.dtype.element_ty), mask=ok)
    tl.store(h_out_ptr + state, _cast(h, h_out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + units[None, :], _cast(h, out_ptr.dtype.element_ty),
             mask=ok & (WRITE_OUT != 0))


@triton.jit
def _update_kernel(part_ptr, SPLIT, M, NP, bias_ptr, c_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out, H, WRITE_OUT,
                   UNITS: tl.constexpr):
    """The LSTM update of row m, units j, as its own launch (the engine's `fused = False`)."""
    pid = tl.program_id(0)
    u_tiles = tl.cdiv(H, UNITS)
    m = pid // u_tiles + tl.arange(0, 1)
    _update(part_ptr, SPLIT, M, NP, bias_ptr, c_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out, H, WRITE_OUT,
            m, m < M, (pid % u_tiles) * UNITS + tl.arange(0, UNITS), SPLIT_STEP=min(8, 1024 // UNITS))


@triton.jit
def _arbitrator_kernel(x_ptr, stride_x, D, h_ptr, H, USES_STATE, w1_ptr, b1_ptr, A, w2_ptr, b2_ptr, N_DEC,
                       cut_ptr, dec_ptr, stride_dec, BLOCK_A: tl.constexpr, STEP_K: tl.constexpr,
                       BLOCK_J: tl.constexpr):
    """decisions[m, :] = Linear2(relu(Linear1([x_m | h_m]))) > cut, each layer's output rounded as F.linear's."""
    m = tl.program_id(0)
    a = tl.arange(0, BLOCK_A)
    a_ok = a < A
    n_in = D + H * USES_STATE
    acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for k0 in range(0, n_in, STEP_K):
        k = k0 + tl.arange(0, STEP_K)
        z = _load_z(x_ptr, stride_x, h_ptr, H, D, n_in, m + tl.arange(0, 1), tl.full((1,), 1, tl.int1), k)
        w = _f32(tl.load(w1_ptr + a[:, None] * n_in + k[None, :], mask=a_ok[:, None] & (k < n_in)[None, :],
                         other=0.0))
        acc += tl.sum(w * z, axis=1)
    hidden = tl.maximum(_rounded(acc + _f32(tl.load(b1_ptr + a, mask=a_ok, other=0.0)), w1_ptr), 0.0)
    j = tl.arange(0, BLOCK_J)
    j_ok = j < N_DEC
    w2 = _f32(tl.load(w2_ptr + j[:, None] * A + a[None, :], mask=j_ok[:, None] & a_ok[None, :], other=0.0))
    logit = _rounded(tl.sum(w2 * hidden[None, :], axis=1) + _f32(tl.load(b2_ptr + j, mask=j_ok, other=0.0)),
                     w1_ptr)
    cut = _f32(tl.load(cut_ptr))
    tl.store(dec_ptr + m.to(tl.int64) * stride_dec + j, (logit > cut).to(tl.int8), mask=j_ok)


# ---------------------------------------------------------------------------------------------------
# configurations: every launch uses one listed here (python -m amnets_kernels.aot compiles them all)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
LOWRANK_TILES = (16, 32)  # low-rank layers: tile 16 for H <= 16, else 32
ARBITRATOR_WIDTHS = (16, 32, 64, 128, 256)  # arbitrator_hidden up to 256 (BLOCK_A)
DECISION_BLOCKS = (2, 4, 8)  # up to 8 per-layer decisions (BLOCK_J)


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    """Weights, state and the cut in `dtype`; partial sums and projections fp32; block indices int32;
    decisions int8."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if not name.endswith("_ptr"):
            return "i32"
        if name in ("part_ptr", "s_ptr"):
            return "*fp32"
        if name.endswith(("crow_ptr", "col_ptr")) or name == "count_ptr":
            return "*i32"
        if name in ("full_ptr", "dec_ptr"):
            return "*i8"
        return f"*{_DTYPES[dtype]}"
    return {n: kind(n) for n in kernel.arg_names}


def _name(kernel, dtype, constexprs) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in constexprs.items())
    return f"frame_engine.{kernel.__name__.strip('_')}[{_DTYPES[dtype]},{blocks}]"


def _arbitrator_blocks(width: int, decisions: int) -> dict:
    block_a = max(16, triton.next_power_of_2(width))
    return dict(BLOCK_A=block_a, STEP_K=min(64, 4096 // block_a), BLOCK_J=max(2, triton.next_power_of_2(decisions)))


def _warps(kernel, constexprs) -> int:
    """8 warps for the gates' tiles of several rows, 4 elsewhere. The 4-row tiles hold four blocks' broadcast
    products at once (_walk issues four blocks ahead): at 4 warps ptxas kept a value in local memory across
    their loops (Triton 3.8 fp32 low-rank b=16, 3.6 fp32 sparse b=32; sm_90). A tl.dot tile over 64x64 blocks
    takes 8 too: at 4, Triton 3.6 (the GPU machines') spills its bf16 variant; 3.8 does not. So do the low-rank
    tl.dot tiles: at 4, ptxas (Triton 3.8) kept a 4-byte value of the b=32 ones in local memory across their
    loops once the LSTM update was fused in."""
    if kernel is _gates_kernel and constexprs["BLOCK_M"] < 16:
        return 8 if constexprs["BLOCK_M"] > 1 else 4
    if kernel is _gates_kernel and (constexprs["B"] == 64 or constexprs["LOWRANK"]):
        return 8
    return 4


def _stages(kernel) -> int:
    """Software pipelining (cp.async) for the loops that stream weights, where Triton does it: the tl.dot
    tiles (from 16 rows). The smaller tiles get no cp.async from it (the PTX has none): _walk issues four
    blocks' loads ahead by hand, and _project_kernel takes few steps."""
    return 3 if kernel in (_gates_kernel, _project_kernel) else 1


def _project_tile(block_m: int) -> dict:
    """_project_kernel's ranks per program and inputs per step. Below 16 rows (no tl.dot) 4 ranks a program in
    steps of 256 inputs: at 16 ranks by 64 a B=1 frame at rank 128 ran 16 programs of 16 dependent steps each,
    11 us a layer on the H200 (2026-12-04 run4); now 64 programs of 4 steps. (Rank sizes are padded to BLOCK_R,
    a multiple of both.)"""
    return dict(RANK_STEP=BLOCK_R, STEP_K=BLOCK_K) if block_m >= 16 else dict(RANK_STEP=4, STEP_K=256)


def _all_configs() -> dict:
    configs = []
    for dtype in _DTYPES:
        def add(kernel, **constexprs):
            configs.append(AotConfig(_name(kernel, dtype, constexprs), kernel, _signature(kernel, dtype, constexprs),
                                     constexprs, _warps(kernel, constexprs), _stages(kernel)))
        for rows in ROW_TILES:
            for b in SPARSE_BLOCKS:
                add(_gates_kernel, B=b, BLOCK_M=rows, LOWRANK=False, RANK_STEP=BLOCK_R)
            for b in LOWRANK_TILES:
                add(_gates_kernel, B=b, BLOCK_M=rows, LOWRANK=True, RANK_STEP=BLOCK_R)
            add(_project_kernel, BLOCK_M=rows, **_project_tile(rows))
        add(_update_kernel, UNITS=UPDATE_UNITS)
        for width in ARBITRATOR_WIDTHS:
            for block_j in DECISION_BLOCKS:
                add(_arbitrator_kernel, **_arbitrator_blocks(width, block_j))
    return {c.name: c for c in configs}


_CONFIGS = _all_configs()
AOT_CONFIGS = list(_CONFIGS.values())
MAX_ARBITRATOR_WIDTH, MAX_DECISIONS = max(ARBITRATOR_WIDTHS), max(DECISION_BLOCKS)


def _launch(kernel, grid: int | tuple, dtype, *args, **constexprs):
    """Launch with the AOT-listed configuration (a KeyError is a configuration aot never checked)."""
    config = _CONFIGS[_name(kernel, dtype, constexprs)]
    with launch_turn():
        kernel[grid if isinstance(grid, tuple) else (grid,)](*args, **constexprs, num_warps=config.num_warps,
                                                             num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------------
# packing


def _tile_rows(w: torch.Tensor, hidden: int, padded: int) -> torch.Tensor:
    """(4H, ...) gate rows -> (4 * Hp, ...): gate g's rows at g * Hp, zero rows between."""
    out = w.new_zeros((4, padded) + tuple(w.shape[1:]))
    out[:, :hidden] = w.reshape((4, hidden) + tuple(w.shape[1:]))
    return out.reshape((4 * padded,) + tuple(w.shape[1:]))


def _bsr(w: torch.Tensor, b: int, keep: torch.Tensor | None = None) -> tuple:
    """(values (nnzb, b, b), crow int32, col int32) of the b x b blocks of w (rows a multiple of b) that hold
    a nonzero entry, or the blocks `keep` (block grid bool) says; w is zero-padded to whole blocks."""
    rows, cols = w.shape
    nb_r, nb_c = rows // b, -(-cols // b)
    padded = w.new_zeros(rows, nb_c * b)
    padded[:, :cols] = w
    blocks = padded.reshape(nb_r, b, nb_c, b).transpose(1, 2)  # (nb_r, nb_c, b, b)
    if keep is None:
        keep = blocks.ne(0).any(-1).any(-1)
    values = blocks[keep].contiguous()
    crow = torch.zeros(nb_r + 1, dtype=torch.int32, device=w.device)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(torch.int32)
    if values.shape[0] == 0:  # a valid pointer for the kernel, never read (every loop bound is 0)
        values, col = w.new_zeros(1, b, b), torch.zeros(1, dtype=torch.int32, device=w.device)
    return values, crow, col.contiguous()


class _Layer:
    """One layer packed for the kernels (see the module docstring)."""

    def __init__(self, cheap: str, full: torch.Tensor, bias: torch.Tensor, hidden: int, block: int,
                 element_mask: torch.Tensor | None = None, factors: list | None = None):
        self.hidden, self.inputs = hidden, full.shape[1] - hidden
        self.block = block
        self.padded = -(-hidden // block) * block
        self.bias = bias.contiguous()
        w = _tile_rows(full, hidden, self.padded)
        self.lowrank = cheap == "lowrank"
        if self.lowrank:
            grid = (4 * self.padded // block, -(-w.shape[1] // block))
            self.kept = _bsr(w, block, torch.zeros(grid, dtype=torch.bool, device=w.device))  # none
            self.rest = _bsr(w, block, torch.ones(grid, dtype=torch.bool, device=w.device))  # every block
            u_ih, v_ih, u_hh, v_hh = factors
            self.rank_ih = -(-v_ih.shape[0] // BLOCK_R) * BLOCK_R
            rank_hh = -(-v_hh.shape[0] // BLOCK_R) * BLOCK_R
            self.rank = self.rank_ih + rank_hh
            u = w.new_zeros(4 * hidden, self.rank)
            u[:, :u_ih.shape[1]] = u_ih
            u[:, self.rank_ih:self.rank_ih + u_hh.shape[1]] = u_hh
            self.u = _tile_rows(u, hidden, self.padded).contiguous()
            self.v_ih, self.v_hh = (_pad_rows(v, r).contiguous() for v, r in ((v_ih, self.rank_ih), (v_hh, rank_hh)))
        else:
            mask = _tile_rows(element_mask.to(w.dtype), hidden, self.padded)
            # blocks holding only zeros are not stored (their product is 0): padding rows, and for the rest
            # the blocks the sparse branch keeps whole
            self.kept, self.rest = _bsr(w * mask, block), _bsr(w * (1 - mask), block)
            self.rank = self.rank_ih = 0
            self.u = self.v_ih = self.v_hh = w.new_zeros(1)


def _pad_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    out = v.new_zeros(rows, v.shape[1])
    out[:v.shape[0]] = v
    return out


# ---------------------------------------------------------------------------------------------------
# the engine


class FrameEngine:
    """The frame engine on the device: `run(x, h, c, force_code, force_rows, cut)` as the CPU engine's.

    x (B, T, D) frames; h, c (L, B, H) state; force_code -1 (the arbitrator decides, p_full > threshold
    as logit > cut), 0 / 1 (every row cheap / full), 2 (force_rows, a (B,) bool tensor, True = full)
    -> (out (B, T, H), h, c, decisions (B, T) or (B, T, L) bool). `split` (programs per block row), `fused`
    (the LSTM update inside the gates launch; False: its own launch), `graphs` (CUDA graphs on CUDA
    tensors; env AMNETS_CUDA_GRAPHS=0 turns them off) and `native_call` (a graph's call as one native call,
    _C.GraphCall, where the build has its CUDA part; env AMNETS_GRAPH_CALL=python: from Python) are for tests and
    tuning: the same results either way. Where the native call is wanted and cannot be had, the engine warns
    once and `native_call` turns False.
    """

    face = "triton"

    def __init__(self, cheap: str, layers: list[dict], arbitrator: list[torch.Tensor], input_size: int,
                 uses_state: bool, per_layer: bool, block_size: int, split: int | None = None,
                 graphs: bool | None = None, fused: bool = True):
        first = layers[0]["full"]
        self.dtype, self.device = first.dtype, first.device
        if self.dtype not in _DTYPES:
            raise ValueError(f"FrameEngine (triton): weights must be float32 or bfloat16; got {self.dtype}")
        self.hidden = layers[0]["bias"].shape[0] // 4
        self.input_size, self.uses_state, self.per_layer = input_size, uses_state, per_layer
        if cheap == "sparse" and block_size not in SPARSE_BLOCKS:
            raise ValueError(f"FrameEngine (triton): block_size must be one of {SPARSE_BLOCKS}; got {block_size}")
        tile = block_size if cheap == "sparse" else (16 if self.hidden <= 16 else 32)
        with torch.no_grad():
            self.layers = [_Layer(cheap, d["full"].detach(), d["bias"].detach(), self.hidden, tile,
                                  d.get("mask"), [f.detach() for f in d.get("factors", [])] or None)
                           for d in layers]
            self.arb = [t.detach().contiguous() for t in arbitrator]
        self.arb_width = self.arb[0].shape[0]
        self.decisions = len(layers) if per_layer else 1
        if self.arb_width > MAX_ARBITRATOR_WIDTH or self.decisions > MAX_DECISIONS:
            raise ValueError(f"FrameEngine (triton): arbitrator_hidden <= {MAX_ARBITRATOR_WIDTH} and at most "
                             f"{MAX_DECISIONS} per-layer decisions; got {self.arb_width}, {self.decisions}")
        self.split, self.fused = split, fused
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 0)
        env = os.environ.get("AMNETS_CUDA_GRAPHS", "1") != "0"
        self.graphs = (env if graphs is None else graphs) and self.device.type == "cuda"
        self.native_call = self.graphs and os.environ.get("AMNETS_GRAPH_CALL", "native") != "python"
        if self.native_call and not hasattr(_C, "GraphCall"):
            self._no_native_call("this build of amnets_kernels._C has no CUDA part")
        self._graphs: collections.OrderedDict = collections.OrderedDict()  # _Chunk by shape, captured or not
        self._lock = threading.Lock()  # one chunk launch at a time: a chunk's static buffers are shared
        self._cut, self._cut_value = torch.zeros(1, dtype=self.dtype, device=self.device), 0.0

    def _no_native_call(self, why: str) -> None:
        warnings.warn(f"FrameEngine (triton): {why}, so a CUDA graph's call runs from Python (x in, the replay and "
                      "two copies out, each through the binding layer: more host time a call); native_call is False",
                      _backend.FallbackWarning, stacklevel=3)
        self.native_call = False

    # -- checks: the engine is called without stream()'s checks (Streamer) ---------------------------
    def _check(self, x, h, c, code, rows):
        self._check_x(x)
        self._check_state(h, c, x.shape[0])
        self._check_force(code, rows, x.shape[0])

    def _check_x(self, x, batch: int | None = None):
        op = "FrameEngine"
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.input_size \
                or batch not in (None, x.shape[0]):
            raise ValueError(f"{op}: x must be a ({batch or 'B'}, T, {self.input_size}) tensor")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"{op}: x must be {self.dtype} on {self.device}; got {x.dtype} on {x.device}")

    def _check_force(self, code, rows, batch: int):
        op = "FrameEngine"
        if code not in (-1, 0, 1, 2):
            raise ValueError(f"{op}: force must be -1, 0, 1 or 2; got {code!r}")
        if code == 2 and not (isinstance(rows, torch.Tensor) and rows.dtype == torch.bool
                              and tuple(rows.shape) == (batch,) and rows.device == self.device):
            raise ValueError(f"{op}: force = 2 needs rows, a bool tensor of shape ({batch},) on {self.device}")

    def _check_state(self, h, c, batch: int):
        shape = (len(self.layers), batch, self.hidden)
        for name, t in (("h", h), ("c", c)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != self.dtype \
                    or t.device != self.device:
                raise ValueError(f"FrameEngine: {name} must have shape {shape}, dtype {self.dtype}, on {self.device}")

    def run(self, x, h, c, code: int, rows, cut: float):
        """stream()'s chunk with the state passed in and out (new tensors: h and c are left as they are)."""
        self._check(x, h, c, code, rows)
        B, T, _ = x.shape
        if B == 0 or T == 0:
            out, dec = self._nothing(x)
            return out, h.clone(), c.clone(), dec
        with self._lock:
            chunk = self._entry(B, T, code)
            chunk.evict()
            chunk.h.copy_(h)
            chunk.c.copy_(c)
            out, dec = chunk.launch(x, rows.to(torch.int8) if code == 2 else None, cut)
            h, c = chunk.h.clone(), chunk.c.clone()
        return out, h, c, dec

    def stream(self, batch: int, code: int, rows, cut: float) -> "Stream":
        """A live stream on this engine, as the CPU engine's: `s(x) -> (out, decisions)`, the state kept."""
        return Stream(self, batch, code, rows, cut)

    def _nothing(self, x):
        """(out, decisions) of a chunk of no frames (or no rows)."""
        dec = torch.zeros(*x.shape[:2], self.decisions, dtype=torch.int8, device=self.device)
        return x.new_zeros(*x.shape[:2], self.hidden), self._decisions(dec)

    def _decisions(self, dec):
        dec = dec.view(torch.bool)
        return dec if self.per_layer else dec[..., 0]

    def _entry(self, batch: int, frames: int, code: int) -> "_Chunk":
        """The chunk of this shape (captured as a CUDA graph when graphs are on); the oldest beyond GRAPHS_KEPT
        is dropped, its holder's state copied out first (so that its buffers and graph are freed)."""
        key = (batch, frames, code, self.split, self.fused, self.graphs, self.native_call)  # fixed in a capture
        chunk = self._graphs.get(key)
        if chunk is None:
            chunk = self._graphs[key] = _Chunk(self, batch, frames, code)
            while len(self._graphs) > GRAPHS_KEPT:
                self._graphs.popitem(last=False)[1].evict()
        self._graphs.move_to_end(key)
        return chunk

    def _workspace(self, batch: int) -> dict:
        """A chunk's scratch for B rows, allocated once (so that a captured graph holds kernels only), and its
        launch shapes: rows per program, row tiles, splits, the projection's tile."""
        block_m = 1 if batch == 1 else 4 if batch <= 4 else 16
        m_tiles = -(-batch // block_m)
        f32 = dict(dtype=torch.float32, device=self.device)
        split = self._split(m_tiles)
        return dict(block_m=block_m, m_tiles=m_tiles, split=split, project=_project_tile(block_m),
                    part=torch.empty(split, batch, max(4 * layer.padded for layer in self.layers), **f32),
                    s=torch.empty(batch, max(layer.rank for layer in self.layers) or 1, **f32),
                    # the fused update's arrival counts, one per (row tile, unit group): each last arrival zeroes
                    # its own, so they are zero again after every launch
                    counts=torch.zeros(m_tiles * max(layer.padded // layer.block for layer in self.layers),
                                       dtype=torch.int32, device=self.device))

    def _launches(self, x, h, h_next, c, dec, out, code: int, work: dict) -> None:
        """Every launch of a chunk and nothing else (what a CUDA graph captures: each fill or copy would be a
        node of its own). x contiguous (B, T, D). Frame t reads h from `h` (t even) or `h_next` (t odd) and
        writes the other, so the final h is in h_next when T is odd; c is updated in place (a unit's update
        reads and writes its own c only). dec (B, T, decisions) int8: the arbitrator writes it (code -1), else
        it holds the forced decisions. out (B, T, H)."""
        B, T, _ = x.shape
        L, H = len(self.layers), self.hidden
        block_m, m_tiles, split, project = work["block_m"], work["m_tiles"], work["split"], work["project"]
        part, s, counts = work["part"], work["s"], work["counts"]
        states = (h, h_next)
        for t in range(T):
            old_h, new_h = states[t % 2], states[(t + 1) % 2]
            if code == -1:
                w1, b1, w2, b2 = self.arb
                _launch(_arbitrator_kernel, B, self.dtype, x[:, t], x.stride(0), self.input_size, old_h[L - 1], H,
                        int(self.uses_state), w1, b1, self.arb_width, w2, b2, self.decisions, self._cut, dec[:, t],
                        dec.stride(0), **_arbitrator_blocks(self.arb_width, self.decisions))
            inp, stride_in = x[:, t], x.stride(0)
            for k, layer in enumerate(self.layers):
                full = dec[:, t, k if self.per_layer else 0]
                D, NP = layer.inputs, 4 * layer.padded
                if layer.lowrank:
                    _launch(_project_kernel, m_tiles * (layer.rank // project["RANK_STEP"]), self.dtype, inp,
                            stride_in, D, old_h[k], H, H, B, full, dec.stride(0), layer.v_ih, layer.v_hh,
                            layer.rank_ih, s, layer.rank, BLOCK_M=block_m, **project)
                lines = NP // layer.block
                update = (layer.bias, c[k], new_h[k], c[k], out[:, t], out.stride(0), H, int(k == L - 1))
                _launch(_gates_kernel, (4 * split, m_tiles, lines // 4), self.dtype, inp, stride_in, old_h[k], H, D,
                        D + H, B, full, dec.stride(0), *layer.kept, *layer.rest, layer.u, s, layer.rank, part, NP,
                        split, int(self.fused), counts, *update, B=layer.block, BLOCK_M=block_m,
                        LOWRANK=layer.lowrank, RANK_STEP=BLOCK_R)
                if not self.fused:
                    _launch(_update_kernel, B * -(-H // UPDATE_UNITS), self.dtype, part, split, B, NP, *update,
                            UNITS=UPDATE_UNITS)
                inp, stride_in = new_h[k], H

    def _split(self, m_tiles: int) -> int:
        """Programs per block row: enough for four per SM on a GPU (latency hiding at B=1: a program walks
        its blocks one after the other), no more than a row's blocks; 2 under the interpreter, so the
        tests cover the sums over splits. Untuned: no GPU has run it yet. The gates kernel takes its share of
        a row's blocks in int32 (blocks * split < 2**31) and row tiles and unit groups from grid axes 1 and 2
        (< 2**16 each)."""
        most = max(-(-(layer.inputs + self.hidden) // layer.block) for layer in self.layers)
        groups = max(layer.padded // layer.block for layer in self.layers)
        if m_tiles >= 2**16 or groups >= 2**16:
            raise ValueError(f"FrameEngine (triton): at most {2**16 - 1} row tiles and unit groups; got {m_tiles} "
                             f"and {groups} (batch and hidden_size / block)")
        if self.split is not None:
            if not 1 <= self.split < 2**31 // most:
                raise ValueError(f"FrameEngine (triton): split must be in 1 .. {2**31 // most - 1}; got {self.split}")
            return self.split
        if self.device.type != "cuda":
            return 2
        lines = min(4 * layer.padded // layer.block for layer in self.layers)
        blocks = min(-(-(layer.inputs + self.hidden) // layer.block) for layer in self.layers)
        return max(1, min(blocks, -(-4 * self._sms // (lines * m_tiles))))


class _Chunk:
    """One chunk shape's buffers, allocated once: x in (under graphs), the state, decisions, out and the
    launches' scratch. The state stays here for the stream that holds it (`holder`: the next call of that stream
    copies nothing in; any other use copies the holder's state out first): c in one buffer (updated in place),
    h in whichever of two the last chunk left it (`parity`). Under graphs the launches are captured once per
    parity they can start from (both when T is odd: a chunk ends in the other buffer), so a call copies x in,
    replays and copies out and decisions out, in one native call (_C.GraphCall) or from Python; else they run
    eagerly on the caller's x (the interpreter tests this path, with the same buffers)."""

    def __init__(self, engine: FrameEngine, batch: int, frames: int, code: int):
        self.engine, self.code, self.frames = engine, code, frames
        device, dtype = engine.device, engine.dtype
        state = (len(engine.layers), batch, engine.hidden)
        self.hs = tuple(torch.zeros(state, dtype=dtype, device=device) for _ in range(2))
        self.parity = 0
        self.c = torch.zeros(state, dtype=dtype, device=device)
        self.x = torch.zeros(batch, frames, engine.input_size, dtype=dtype, device=device) if engine.graphs else None
        # out and the decisions, views of one byte buffer (the native call copies both out at once)
        out_bytes = batch * frames * engine.hidden * self.c.element_size()
        dec_bytes = batch * frames * engine.decisions
        self.results = torch.empty(-(-(out_bytes + dec_bytes) // 8) * 8, dtype=torch.uint8, device=device)
        self.out = self.results[:out_bytes].view(dtype).view(batch, frames, engine.hidden)
        # forced chunks: the decisions are filled here (0 / 1) or by launch() when the rows change (2), not by a
        # node of the graph; the arbitrator writes them (-1)
        self.dec = self.results[out_bytes:out_bytes + dec_bytes].view(torch.int8).view(batch, frames, engine.decisions)
        self.dec.fill_(int(code == 1))
        self.decisions = engine._decisions(self.dec)  # the view a call copies
        self.rows_from = None  # the int8 rows tensor last copied into dec (a stream's: the same each call)
        self.work = engine._workspace(batch)
        self.holder = None  # weakref to the Stream whose state the buffers hold
        self.graphs = None
        if engine.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile every kernel before capture
                self._launches(self.x, 0)
            torch.cuda.current_stream().wait_stream(side)
            for t in (*self.hs, self.c):
                t.zero_()
            self.graphs = [self._capture(parity) for parity in ((0, 1) if frames % 2 else (0,))]

    def _launches(self, x, parity: int) -> None:
        self.engine._launches(x, self.hs[parity], self.hs[1 - parity], self.c, self.dec, self.out, self.code,
                              self.work)

    def _capture(self, parity: int):
        """The launches from h buffer `parity` captured as a CUDA graph -> its call, (x) -> (out, decisions)."""
        engine = self.engine
        if engine.native_call:
            call = _C.GraphCall(self.x, self.results, self.out, self.decisions)
            side = torch.cuda.Stream(engine.device)  # torch's rule: no capture on the default stream
            side.wait_stream(torch.cuda.current_stream(engine.device))
            try:
                with torch.cuda.stream(side):
                    call.begin()
                    try:
                        self._launches(self.x, parity)
                    finally:
                        call.end()
                torch.cuda.current_stream(engine.device).wait_stream(side)
                return call.function()
            except RuntimeError as exc:  # a failed capture: the Python call still works (warned, and flagged)
                engine._no_native_call(f"_C.GraphCall's capture failed ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:200]})")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._launches(self.x, parity)
        x_in, out, decisions = self.x, self.out, self.decisions  # not self: no reference cycle through the call

        def call(x):
            x_in.copy_(x)
            graph.replay()
            return out.clone(), decisions.clone()

        return call

    @property
    def h(self):
        """The h buffer that holds the state now."""
        return self.hs[self.parity]

    def evict(self) -> None:
        """The holder (if any) takes its state out of the buffers, into tensors of its own."""
        holder = self.holder() if self.holder is not None else None
        if holder is not None:
            holder._take_out()
        self.holder = None

    def launch(self, x, rows, cut: float):
        """One chunk on the state in h and c -> (out, decisions), tensors the caller keeps."""
        engine = self.engine
        if cut != engine._cut_value:  # a device scalar: a graph replays with the cut of the call
            engine._cut.fill_(cut)
            engine._cut_value = cut
        if rows is not None and rows is not self.rows_from:
            self.dec.copy_(rows[:, None, None].expand(self.dec.shape))
            self.rows_from = rows
        if self.graphs is None:
            self._launches(x.contiguous(), self.parity)
            result = self.out.clone(), self.decisions.clone()
        else:
            result = self.graphs[self.parity](x)
        self.parity ^= self.frames % 2
        return result


class Stream:
    """FrameEngine.stream: the state (h, c) carried from call to call; state() copies, set_state, reset(),
    fork() (another stream from this state). One thread at a time, as the CPU engine's stream.

    Between calls the state stays in the buffers of the chunk shape last run (`_held`), so the next call of
    that shape copies only x in and out, dec out; else it is in `_h`, `_c`. Every access to it holds the
    engine's lock: another stream's call, on another thread, may evict it."""

    def __init__(self, engine: FrameEngine, batch: int, code: int, rows, cut: float):
        engine._check_force(code, rows, batch)
        self.engine, self.code, self.cut = engine, code, cut
        self.rows = rows.to(torch.int8) if code == 2 else None  # a copy, as the CPU engine's stream takes
        self.shape = (len(engine.layers), batch, engine.hidden)
        self._one_thread = OneThread("FrameEngine stream")
        self._held = None
        self.reset()

    def __call__(self, x):
        now = _backend.get_backend()  # changed since the stream was made: another face is never run silently here
        # ("auto" picks Triton for CUDA tensors only: on CPU tensors, the interpreter's, it picks the cpu engine)
        if now != "triton" and not (now == "auto" and self.engine.device.type == "cuda"):
            raise ValueError(f"AmNetsEncoder.streamer: this stream runs the Triton frame engine, which backend {now!r} "
                             "(now in force) does not run: make a new streamer under it, or call stream()")
        engine = self.engine
        engine._check_x(x, self.shape[1])
        with self._one_thread:
            if x.shape[1] == 0:
                return engine._nothing(x)
            with engine._lock:
                chunk = engine._entry(x.shape[0], x.shape[1], self.code)
                if self._held is not chunk:
                    chunk.evict()
                    for mine, static in zip(self._tensors(), (chunk.h, chunk.c)):
                        static.copy_(mine)
                    self._drop()
                    chunk.holder, self._held = weakref.ref(self), chunk
                out, dec = chunk.launch(x, self.rows, self.cut)
        return out, dec

    def _tensors(self):
        """The state where it is now (not a copy); under the engine's lock."""
        return (self._held.h, self._held.c) if self._held is not None else (self._h, self._c)

    def _take_out(self):
        """The state out of the held chunk's buffers into tensors of this stream's own; under the engine's lock."""
        self._h, self._c = (t.clone() for t in self._tensors())
        self._drop()

    def _drop(self):
        """Leave the held chunk's buffers to others from now on; under the engine's lock."""
        if self._held is not None:
            self._held.holder = None
            self._held = None

    def state(self):
        with self._one_thread, self.engine._lock:
            return tuple(t.clone() for t in self._tensors())

    def set_state(self, h, c):
        self.engine._check_state(h, c, self.shape[1])
        with self._one_thread, self.engine._lock:
            self._drop()
            self._h, self._c = h.clone(), c.clone()

    def reset(self):
        h = torch.zeros(self.shape, dtype=self.engine.dtype, device=self.engine.device)
        with self._one_thread, self.engine._lock:
            self._drop()
            self._h, self._c = h, torch.zeros_like(h)

    def fork(self) -> "Stream":
        other = Stream(self.engine, self.shape[1], self.code, None if self.rows is None else self.rows.bool(), self.cut)
        with self._one_thread, self.engine._lock:
            other._h, other._c = (t.clone() for t in self._tensors())
        return other
