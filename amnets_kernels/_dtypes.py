"""The accumulation dtype: part of the face contract (every face, the reference included, computes
fp16/bf16 inputs in float32 and rounds at the end; float64 stays float64)."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype every face uses for `dtype` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
