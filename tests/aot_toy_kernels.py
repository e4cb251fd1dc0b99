"""Two Triton kernels for tests/test_aot.py: one that fits its registers and one that cannot."""

import triton
import triton.language as tl

from amnets_kernels.aot import AotConfig


@triton.jit
def scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


@triton.jit
def hog(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # A (BLOCK, BLOCK) fp32 tile kept live by one warp: far more than 255 registers per thread.
    rows = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tile = tl.load(x_ptr + rows)
    tl.store(y_ptr + rows, tl.exp(tile) + tl.sum(tile, 1)[:, None])


AOT_CONFIGS = [
    AotConfig("toy.scale[BLOCK=1024]", scale, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
              {"BLOCK": 1024}),
    AotConfig("toy.hog[BLOCK=128,warps=1]", hog, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
              {"BLOCK": 128}, num_warps=1),
]
