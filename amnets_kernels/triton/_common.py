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
