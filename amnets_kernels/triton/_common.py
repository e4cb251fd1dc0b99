"""Device helpers shared by the Triton faces."""

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (set before import) bf16 arithmetic is wrong: loads are widened at once.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def acc(x):
    """x in the accumulation dtype: float64 stays float64, every other dtype computes in float32."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)
