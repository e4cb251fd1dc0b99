"""Reference faces: pure PyTorch, float64-capable, written to be obviously right (the oracle).

Each module has `<op>_forward` and `<op>_backward` with the contract of amnets_kernels/_ops/.
fp16/bf16 inputs are computed in float32 and rounded at the end (what the fast faces must match);
float64 stays float64.
"""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype every face uses for `dtype` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
