"""BlockSparseLinear: nn.Linear with a block-sparse weight (the pruned AmNets branch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats import BlockSparseMatrix


class BlockSparseLinear(nn.Module):
    """y = x @ W^T + bias with W kept as b x b blocks; only the stored blocks are parameters.

    Parameters: `values` (nnzb, b, b) and `bias`; buffers: `crow_indices`, `col_indices` (the pattern,
    fixed after construction). `sparse_weight` is a BlockSparseMatrix view over them.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 32, sparsity: float = 0.75,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        # nn.Linear's initialisation, then magnitude block pruning.
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._adopt(BlockSparseMatrix.from_dense(dense, block_size=block_size, sparsity=sparsity))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _adopt(self, matrix: BlockSparseMatrix) -> None:
        self.in_features, self.out_features = matrix.shape[1], matrix.shape[0]
        self.block_size = matrix.block_size
        self.values = nn.Parameter(matrix.values.detach().clone())
        self.register_buffer("crow_indices", matrix.crow_indices.clone())
        self.register_buffer("col_indices", matrix.col_indices.clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size: int = 32, sparsity: float | None = 0.75,
                   mask: torch.Tensor | None = None) -> BlockSparseLinear:
        """Prune an nn.Linear: keep its largest-norm blocks (or those of `mask`, a block mask or the
        element mask torch.nn.utils.prune leaves as `weight_mask`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BlockSparseLinear.from_dense: linear must be an nn.Linear; got {type(linear).__name__}")
        if mask is not None:
            sparsity = None
        elif hasattr(linear, "weight_mask"):  # torch.nn.utils.prune was applied: honour its mask
            mask, sparsity = linear.weight_mask, None
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(BlockSparseMatrix.from_dense(linear.weight.detach(), block_size=block_size, sparsity=sparsity,
                                                   mask=mask))
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return module

    @classmethod
    def from_torch_bsr(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       shape: tuple[int, int] | None = None) -> BlockSparseLinear:
        """From a torch.sparse_bsr weight (optionally cropped to a logical `shape`)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(BlockSparseMatrix.from_torch_bsr(weight, shape))
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return module

    @property
    def sparse_weight(self) -> BlockSparseMatrix:
        return BlockSparseMatrix(self.values, self.crow_indices, self.col_indices,
                                 (self.out_features, self.in_features))

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.amnets.bsr_linear(x, self.values, self.crow_indices, self.col_indices, self.out_features,
                                           self.in_features, self.bias)

    def get_extra_state(self):
        return {"shape": (self.out_features, self.in_features), "block_size": self.block_size}

    def set_extra_state(self, state):
        self.out_features, self.in_features = state["shape"]
        self.block_size = state["block_size"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pattern may differ from this module's (another pruning): take the saved tensors' sizes.
        for name in ("values", "crow_indices", "col_indices"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                if name == "values":
                    self.values = nn.Parameter(current.new_empty(saved.shape))
                else:
                    setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")
