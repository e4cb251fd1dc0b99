"""Triton face of bsr_linear (contract: amnets_kernels/_ops/bsr.py; math: amnets_kernels/reference/bsr.py).

Layout: the BSR format as stored (values (nnzb, b, b), each block row-major, the blocks of a block row
contiguous, block column col_indices[k]) is read in place; nothing is repacked, so a weight that
changes every step (training) costs nothing extra.

Design. One kernel walks lines of blocks (forward and grad_x), two compute grad_values.

_bsr_mm_kernel     out (M, OUT) = a (M, IN) @ op(W), walking one "line" of blocks per program:
                   forward   y = x @ W^T:    lines are block rows (crow_indices), TRANS=False;
                   grad_x    = grad_y @ W:   lines are block columns, TRANS=True, through a column-major
                                             index (ccol, block ids by column, their block rows) built
                                             per call on the host with torch ops (O(nnzb), tiny).
                   A program owns ROWS outputs of one line and BLOCK_M rows of a, and loops over the
                   line's blocks WIDTH // b at a time (small blocks are gathered several per step, so a
                   step always reads a WIDTH-wide slice of a and a WIDTH x ROWS weight tile).
                   Two ways to multiply, chosen per call (USE_DOT):
                     few rows (M < 16), b < 16, or float64: broadcast-multiply-reduce,
                       acc (BLOCK_M, ROWS) += sum_j a[:, j, None] * w[None, j, :], with BLOCK_M in
                       {1, 4, 16} (M is not padded up to tl.dot's 16): every weight byte is read once
                       per M tile, one tile for M <= 16, so small-M calls stay memory-bound;
                     otherwise (b in {16, 32, 64}, M >= 16, fp32/fp16/bf16): tl.dot on BLOCK_M x WIDTH
                       and WIDTH x ROWS tiles (tensor cores for fp16/bf16; IEEE fp32, not TF32, for fp32).
                   The bias is added in the epilogue (a runtime flag masks its load off when absent).
grad_values[k] = grad_y[:, rows of block k]^T @ x[:, cols of block k] (an SDDMM), at the stored blocks:
  _bsr_sddmm_kernel         b in {16, 32, 64}, not float64: one program per stored block, tl.dot over M
                            in tiles of 32 rows into a b x b accumulator;
  _bsr_sddmm_gather_kernel  b < 16 or float64: one program per 256 consecutive entries of grad_values
                            (several small blocks, or a slice of a big one), each entry gathering its
                            grad_y and x columns, summed over M in tiles of 8 rows; b enters as a
                            runtime shift, so one compiled variant serves every block size.
The bias gradient is a plain column sum, done outside (amnets_kernels/_ops/bsr.py).

Padding. The logical (N, K) need not be whole blocks. Block entries outside it may hold anything
(inf/NaN): every weight load is masked to the logical matrix (other=0), as is every load of x or
grad_y, so such entries are never loaded, let alone multiplied; grad_values is 0 there.

Numbers. Accumulation in float32 (float64 for float64 inputs), whatever the input dtype; the output is
rounded to the input dtype once. Under TRITON_INTERPRET=1 every loaded fp16/bf16 value is cast to
float32 right away (the interpreter's bf16 arithmetic is wrong), including tl.dot operands.
Each output element is written by exactly one program (no atomics), so results are deterministic.

Limits. Block sizes b must be powers of two up to 64 (1, 2, 4, 8, 16, 32, 64); any other b raises
ValueError (the reference and cpu faces take any b). float64 is supported, on the tl.dot-free paths
with 16-row tiles (exact, not fast). crow/col indices may be int32 or int64 (int64 is narrowed to
int32 per call: fewer than 2**31 blocks). Tile sizes are not tuned: the H200 run (Triton 3.6;
benchmarks/results/nvidia-h200.md) timed them as they are. They are chosen for 0 spills when compiled by
Triton 3.6 and 3.8 (python -m amnets_kernels.aot lists every configuration).
Triton 3.6's interpreter cannot run these kernels (it cannot take a loop bound loaded from memory);
3.8's can, and compiled code runs on both.
"""

import inspect
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..aot import AotConfig
from ..formats import block_grid, block_row_of
from ._common import INTERPRETED as _INTERPRETED
from ._common import acc as _acc
from ._common import cast as _cast
from ._common import launch_turn

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)
DOT_BLOCK_SIZES = (16, 32, 64)  # tl.dot needs every tile dimension >= 16
DOT_MIN_ROWS = 16

# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _operand(x):
    """A loaded tl.dot operand: its own dtype on a GPU (tensor cores for fp16/bf16), float32 under the
    interpreter (whose bf16 arithmetic is wrong)."""
    if _INTERPRETED:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _bsr_mm_kernel(a_ptr, values_ptr, start_ptr, order_ptr, other_ptr, bias_ptr, out_ptr, M, OUT, IN,
                   HAS_BIAS, B: tl.constexpr, TRANS: tl.constexpr, USE_DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """out[:, line's ROWS outputs] = a @ (the line's blocks) (+ bias), for one BLOCK_M tile of rows.

    Lines: blocks start_ptr[line] .. start_ptr[line + 1] - 1 of the walk; step k's block is
    order_ptr[k] (TRANS) or k itself (block rows are stored contiguously), and other_ptr[k] is its
    position across the line (its block column, or for TRANS its block row), which picks a's columns.
    Weight entry (output o, input i) of a block is values[blk, o, i], or values[blk, i, o] for TRANS.
    """
    # 1-D grid, M tiles fastest: neighbouring programs share the line's weights (L2), and no grid axis
    # limit (65535) applies to the number of lines or M tiles.
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    CHUNKS: tl.constexpr = B // ROWS
    GROUP: tl.constexpr = WIDTH // B  # blocks per step
    line = pid // (m_tiles * CHUNKS)
    o = (pid // m_tiles) % CHUNKS * ROWS + tl.arange(0, ROWS)  # outputs within the block
    outs = line * B + o
    out_ok = outs < OUT
    ms = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    a_rows = a_ptr + ms.to(tl.int64)[:, None] * IN

    j = tl.arange(0, WIDTH)  # a step's slice: block g = j // B of the step, its input c = j % B
    g = j // B
    c = j % B
    if TRANS:
        w_offsets = c[:, None] * B + o[None, :]
    else:
        w_offsets = o[None, :] * B + c[:, None]

    start = tl.load(start_ptr + line)
    end = tl.load(start_ptr + line + 1)
    if values_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
    for k in range(start, end, GROUP):
        kk = k + g
        live = kk < end
        if TRANS:
            blk = tl.load(order_ptr + kk, mask=live, other=0)
        else:
            blk = kk
        ins = tl.load(other_ptr + kk, mask=live, other=0) * B + c
        # Inputs past IN are padding: neither their weights (maybe inf/NaN) nor a is loaded there.
        in_ok = live & (ins < IN)
        a = tl.load(a_rows + ins[None, :], mask=m_ok[:, None] & in_ok[None, :], other=0.0)
        w = tl.load(values_ptr + blk.to(tl.int64)[:, None] * (B * B) + w_offsets,
                    mask=in_ok[:, None] & out_ok[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(_operand(a), _operand(w), acc, input_precision="ieee")
        else:
            acc += tl.sum(_acc(a)[:, :, None] * _acc(w)[None, :, :], axis=1)

    # HAS_BIAS is a runtime flag (no bias: a masked-off load), not one more constexpr to compile for.
    bias = _acc(tl.load(bias_ptr + outs, mask=out_ok & (HAS_BIAS != 0), other=0.0))
    acc += bias[None, :]
    tl.store(out_ptr + ms.to(tl.int64)[:, None] * OUT + outs[None, :], _cast(acc, out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & out_ok[None, :])


@triton.jit
def _bsr_sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, grad_ptr, M, N, K,
                      B: tl.constexpr, BLOCK_M: tl.constexpr):
    """grad_values[k] = g[:, rows of block k]^T @ x[:, cols of block k], block k = program k, as a
    (B, B) tl.dot accumulation over M in BLOCK_M-row tiles; 0 in the padding."""
    blk = tl.program_id(0)
    r = tl.arange(0, B)
    c = tl.arange(0, B)
    outs = tl.load(rows_ptr + blk) * B + r
    ins = tl.load(cols_ptr + blk) * B + c
    out_ok = outs < N
    in_ok = ins < K
    acc = tl.zeros((B, B), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        # g read transposed by addressing: a (B, BLOCK_M) tile without a tl.trans.
        gt = tl.load(g_ptr + ms.to(tl.int64)[None, :] * N + outs[:, None],
                     mask=out_ok[:, None] & m_ok[None, :], other=0.0)
        xs = tl.load(x_ptr + ms.to(tl.int64)[:, None] * K + ins[None, :],
                     mask=m_ok[:, None] & in_ok[None, :], other=0.0)
        acc = tl.dot(_operand(gt), _operand(xs), acc, input_precision="ieee")
    tl.store(grad_ptr + blk.to(tl.int64) * (B * B) + r[:, None] * B + c[None, :],
             _cast(acc, grad_ptr.dtype.element_ty))


@triton.jit
def _bsr_sddmm_gather_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, grad_ptr, M, N, K, TOTAL, LOG2_B,
                             BLOCK_M: tl.constexpr, ENTRIES: tl.constexpr):
    """The same product entry by entry: program p computes entries p*ENTRIES.. of grad_values flattened
    (TOTAL in all), entry e = (block k, r, c) gathering g[:, rows[k]*b + r] and x[:, cols[k]*b + c].
    The block size enters as a runtime shift (b = 2**LOG2_B): one compiled variant for every b."""
    e = tl.program_id(0).to(tl.int64) * ENTRIES + tl.arange(0, ENTRIES)
    e_ok = e < TOTAL
    lanes = (1 << LOG2_B) - 1
    blk = e >> (2 * LOG2_B)
    outs = (tl.load(rows_ptr + blk, mask=e_ok, other=0) << LOG2_B) + ((e >> LOG2_B) & lanes)
    ins = (tl.load(cols_ptr + blk, mask=e_ok, other=0) << LOG2_B) + (e & lanes)
    out_ok = e_ok & (outs < N)
    in_ok = e_ok & (ins < K)
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((ENTRIES,), dtype=tl.float64)
    else:
        acc = tl.zeros((ENTRIES,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        gs = tl.load(g_ptr + ms.to(tl.int64)[:, None] * N + outs[None, :],
                     mask=m_ok[:, None] & out_ok[None, :], other=0.0)
        xs = tl.load(x_ptr + ms.to(tl.int64)[:, None] * K + ins[None, :],
                     mask=m_ok[:, None] & in_ok[None, :], other=0.0)
        acc += tl.sum(_acc(gs) * _acc(xs), axis=0)
    tl.store(grad_ptr + e, _cast(acc, grad_ptr.dtype.element_ty), mask=e_ok)


# ---------------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class _Config:
    kernel: object
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1

    def label(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.constexprs.items()]
                        + [f"warps={self.num_warps}", f"stages={self.num_stages}"])


# _bsr_mm_kernel. A step reads a WIDTH-wide slice of a (several small blocks at once, one to four
# blocks of 16..64). The broadcast path keeps a BLOCK_M x WIDTH x ROWS product live: at most 16 KiB of
# accumulation-dtype values (32 fp32 registers per thread at 4 warps; half the elements in float64), and
# ROWS <= 16 so that a large layer still gets many programs at M = 1. Broadcast BLOCK_M: 1 (M = 1),
# 4 (M <= 4), 16 (M <= 16 in one tile; also the tile for many rows where tl.dot is out: b < 16). float64
# is an exact path, not a fast one: always 16-row tiles (fewer compiled variants).
# The tl.dot path: min(b, 32) outputs by 16 rows (4 warps, no pipelining: with it the fp32 FMA version
# spills on sm_80) or by 64 rows (8 warps, 2 stages; at 4 warps the fp32 version spills). Chosen for 0
# spills, not tuned: the H200 run (benchmarks/results/nvidia-h200.md) only timed them.
_MM_WIDTH = 64
_MM_PRODUCT_BYTES = 16384
_MM_BROADCAST_BLOCK_M = (1, 4, 16)
_MM_ROWS = 16
_MM_DOT_TILES = {16: (4, 1), 64: (8, 2)}  # BLOCK_M: (num_warps, num_stages)
_MM_DOT_ROWS = 32
# _bsr_sddmm_kernel: M tiles of 32 rows; 8 warps for the 64 x 64 accumulator (at 4 the fp32 version
# takes ~200 registers on sm_80). _bsr_sddmm_gather_kernel: 8 rows x 256 entries.
_SDDMM_DOT = {"BLOCK_M": 32}
_SDDMM_DOT_LAUNCH = {16: (4, 2), 32: (4, 2), 64: (8, 1)}  # b: (num_warps, num_stages)
_SDDMM_GATHER = {"BLOCK_M": 8, "ENTRIES": 256}


def _uses_dot(b: int, dtype: torch.dtype) -> bool:
    return b in DOT_BLOCK_SIZES and dtype != torch.float64


def _mm_config(b: int, m: int, dtype: torch.dtype, trans: bool) -> _Config:
    """The _bsr_mm_kernel variant for a (m, .) @ blocks of b product in `dtype` (TRANS: grad_x)."""
    width = max(b, _MM_WIDTH)
    if _uses_dot(b, dtype) and m >= DOT_MIN_ROWS:
        block_m = max(t for t in _MM_DOT_TILES if t <= m)
        warps, stages = _MM_DOT_TILES[block_m]
        return _Config(_bsr_mm_kernel, {"B": b, "TRANS": trans, "USE_DOT": True, "BLOCK_M": block_m,
                                        "ROWS": min(b, _MM_DOT_ROWS), "WIDTH": width}, warps, stages)
    tall = _MM_BROADCAST_BLOCK_M[-1]
    block_m = tall if dtype == torch.float64 else next(t for t in _MM_BROADCAST_BLOCK_M if t >= min(m, tall))
    elements = _MM_PRODUCT_BYTES // (8 if dtype == torch.float64 else 4)
    rows = max(1, min(b, _MM_ROWS, elements // (block_m * width)))
    return _Config(_bsr_mm_kernel, {"B": b, "TRANS": trans, "USE_DOT": False, "BLOCK_M": block_m,
                                    "ROWS": rows, "WIDTH": width}, 4, 1)


def _sddmm_config(b: int, dtype: torch.dtype) -> _Config:
    if _uses_dot(b, dtype):
        return _Config(_bsr_sddmm_kernel, {"B": b, **_SDDMM_DOT}, *_SDDMM_DOT_LAUNCH[b])
    return _Config(_bsr_sddmm_gather_kernel, dict(_SDDMM_GATHER), 4, 1)


def _launch(grid: int, config: _Config, *args):
    """The one place kernels are launched: a 1-D grid, the config's kernel, constexprs and warps."""
    with launch_turn():
        config.kernel[(grid,)](*args, **config.constexprs, num_warps=config.num_warps,
                               num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------------
# faces


def _block_size(values: torch.Tensor) -> int:
    b = values.shape[-1]
    if b not in BLOCK_SIZES:
        raise ValueError(f"bsr_linear: the Triton face handles block sizes {BLOCK_SIZES} (powers of two "
                         f"up to 64); got b = {b} (use the cpu or reference face)")
    return b


def _int32(t: torch.Tensor) -> torch.Tensor:
    # One index dtype in the kernels (half the compiled variants); validated indices fit in int32.
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _mm(a, values, start, order, other, bias, n_lines: int, out_features: int, trans: bool):
    """out (M, out_features) = a @ op(W) (+ bias) with _bsr_mm_kernel over n_lines lines of blocks."""
    m, in_features = a.shape
    b = values.shape[-1]
    out = torch.empty(m, out_features, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    config = _mm_config(b, m, a.dtype, trans)
    programs = n_lines * (b // config.constexprs["ROWS"]) * triton.cdiv(m, config.constexprs["BLOCK_M"])
    _launch(programs, config, a, values, start, order, other, out if bias is None else bias, out, m,
            out_features, in_features, int(bias is not None))
    return out


def bsr_linear_forward(x, values, crow_indices, col_indices, out_features: int, in_features: int, bias):
    """y (M, N) = x @ W^T + bias, in x.dtype; fp32, fp16, bf16 and float64 (see the module docstring
    for the paths and limits: power-of-two block sizes up to 64, else ValueError)."""
    b = _block_size(values)
    crow, col = _int32(crow_indices), _int32(col_indices)
    n_rows, _ = block_grid((out_features, in_features), b)
    # Forward walks block rows in storage order: no order array (col is passed as a placeholder).
    return _mm(x, values, crow, col, col, bias, n_rows, out_features, trans=False)


def _column_index(crow_indices, col_indices, n_cols: int):
    """The pattern by block column: (ccol (Kb+1,), block ids sorted by column, their block rows), int32."""
    cols = col_indices.to(torch.int64)
    order = torch.sort(cols, stable=True).indices  # within a column, block rows stay increasing
    ccol = torch.zeros(n_cols + 1, dtype=torch.int32, device=cols.device)
    ccol[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    return ccol, order.to(torch.int32), block_row_of(crow_indices)[order].to(torch.int32)


def bsr_linear_backward(grad_out, x, values, crow_indices, col_indices, out_features: int, in_features: int,
                        need_x: bool, need_values: bool):
    """(grad_x (M, K) or empty, grad_values (nnzb, b, b) or empty), fresh tensors; the bias gradient is
    done outside. Same dtypes and limits as bsr_linear_forward; grad_out is taken in x's dtype (the
    kernels want one data type)."""
    b = _block_size(values)
    grad_out = grad_out.to(x.dtype)
    n_rows, n_cols = block_grid((out_features, in_features), b)
    grad_x, grad_values = x.new_empty(0), values.new_empty(0)
    if need_x:
        ccol, order, block_rows = _column_index(crow_indices, col_indices, n_cols)
        grad_x = _mm(grad_out, values, ccol, order, block_rows, None, n_cols, in_features, trans=True)
    if need_values:
        m = x.shape[0]
        if m == 0 or values.numel() == 0:
            return grad_x, torch.zeros_like(values)  # a sum over no rows
        grad_values = torch.empty_like(values)
        config = _sddmm_config(b, x.dtype)
        common = (grad_out, x, block_row_of(crow_indices).to(torch.int32), _int32(col_indices), grad_values,
                  m, out_features, in_features)
        if config.kernel is _bsr_sddmm_kernel:
            _launch(values.shape[0], config, *common)
        else:
            programs = triton.cdiv(values.numel(), config.constexprs["ENTRIES"])
            _launch(programs, config, *common, values.numel(), b.bit_length() - 1)
    return grad_x, grad_values


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compile list (python -m amnets_kernels.aot)

_INDEX_POINTERS = ("start_ptr", "order_ptr", "other_ptr", "rows_ptr", "cols_ptr")


def _signature(kernel, data: str) -> dict:
    """`kernel`'s signature for `data` tensors: int32 index pointers, every scalar an i32."""
    signature = {}
    for p in inspect.signature(kernel.fn).parameters.values():
        if p.annotation is tl.constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + ("i32" if p.name in _INDEX_POINTERS else data)
        else:
            signature[p.name] = "i32"
    return signature


def _uses_tl_dot(config: _Config) -> bool:
    return config.kernel is _bsr_sddmm_kernel or config.constexprs.get("USE_DOT", False)


def _aot_configs():
    """Every config the launchers can pick, found by asking them (every M up to past the last tile
    threshold, every block size, both directions), each compiled for the data type whose code differs:
    bf16 for tl.dot on tensor cores (fp16 compiles alike), fp32 for the IEEE fp32 tl.dot and for the
    broadcast/gather paths (fp16/bf16 convert to fp32 right after the load there), fp64 for float64."""
    chosen = {}
    for dtype, data in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float64, "fp64")):
        configs = [_mm_config(b, m, dtype, trans) for b in BLOCK_SIZES for trans in (False, True)
                   for m in range(1, 2 * max(_MM_DOT_TILES) + 1)]
        configs += [_sddmm_config(b, dtype) for b in BLOCK_SIZES]
        for config in configs:
            if dtype == torch.bfloat16 and not _uses_tl_dot(config):
                continue  # fp32 code after the load: compiled as fp32
            chosen.setdefault((config.kernel.fn.__name__, config.label(), data), config)
    return [AotConfig(f"bsr.{name.strip('_')}[{data},{label}]", config.kernel,
                      _signature(config.kernel, data), dict(config.constexprs), config.num_warps,
                      config.num_stages)
            for (name, label, data), config in chosen.items()]


AOT_CONFIGS = _aot_configs()
