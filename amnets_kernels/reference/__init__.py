"""Reference faces: pure PyTorch, float64-capable, written to be obviously right (the oracle).

Each module has `<op>_forward` and `<op>_backward` with the contract of amnets_kernels/_ops/.
fp16/bf16 inputs are computed in float32 and rounded at the end (what the fast faces must match);
float64 stays float64.
"""

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype every face uses for `dtype` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_pointwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """An LSTM step from its gate pre-activations (B, 4H) in nn.LSTM's order i, f, g, o and c (B, H):
    c1 = sigmoid(f) c + sigmoid(i) tanh(g), h1 = sigmoid(o) tanh(c1) -> (h1, c1). Differentiable."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c1), c1
