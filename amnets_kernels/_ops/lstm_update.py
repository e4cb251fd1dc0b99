"""The LSTM update from gate pre-activations, in PyTorch: the streaming steps' pointwise part where no fused
kernel runs (csrc/cpu/lstm_pointwise.h is the compiled one). Production code, not the oracle: the tests
check it against their own."""

import torch
from torch import Tensor


def lstm_pointwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """An LSTM step from its gate pre-activations (B, 4H) in nn.LSTM's order i, f, g, o and c (B, H):
    c1 = sigmoid(f) c + sigmoid(i) tanh(g), h1 = sigmoid(o) tanh(c1) -> (h1, c1). Differentiable."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c1), c1
