"""Device helpers shared by the Triton faces."""

import contextlib
import os
import threading

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (set before import) bf16 arithmetic is wrong: loads are widened at once.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# The interpreter keeps a launch's state (grid, program ids) in module globals: two threads interpreting kernels at
# once broke each other's launches ("x >= grid_dim[0]"). Interpreted launches take turns; compiled ones need none.
_TURN = threading.Lock() if INTERPRETED.value else contextlib.nullcontext()


def launch_turn():
    """`with launch_turn(): kernel[grid](...)`: every launch of the Triton faces."""
    return _TURN


@triton.jit
def acc(x):
    """x in the accumulation dtype: float64 stays float64, every other dtype computes in float32."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), float32 -> bfloat16 rounded to nearest even as compiled Triton does: the interpreter truncates
    toward zero, which biased every bf16 result tested under it by up to an ulp. (NaN stays NaN.)"""
    if INTERPRETED and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, (bits >> 16) | 0x40)
        return bits.to(tl.uint16).to(dtype, bitcast=True)
    else:
        return x.to(dtype)
