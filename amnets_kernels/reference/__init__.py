"""Reference faces: pure PyTorch, float64-capable, written to be obviously right (the oracle).

Each module has `<op>_forward` and `<op>_backward` with the contract of amnets_kernels/_ops/.
fp16/bf16 inputs are computed in float32 and rounded at the end (what the fast faces must match);
float64 stays float64.
"""

from .._dtypes import acc_dtype  # noqa: F401  (the contract; the faces below use it)
