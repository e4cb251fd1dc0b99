"""Weight formats: block-sparse (BSR) matrices and low-rank factors.

BSR layout used by every face: a logical (N, K) matrix is padded to (Nb*b, Kb*b) with
Nb = ceil(N/b), Kb = ceil(K/b); block row r holds blocks crow_indices[r]:crow_indices[r+1] of
`values` (nnzb, b, b), each at block column col_indices[i], columns strictly increasing in a row.
Index arrays are int32. Entries of `values` that fall in the padding do not affect results.
"""

from __future__ import annotations

import json
import numbers

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import _validate


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """(Nb, Kb): block rows and block columns covering a logical (N, K) matrix."""
    return -(-shape[0] // block_size), -(-shape[1] // block_size)


def block_row_of(crow_indices: Tensor) -> Tensor:
    """The block row of every stored block, (nnzb,) int64."""
    counts = crow_indices.diff().to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow_indices.device), counts)


def bsr_to_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The logical (N, K) dense matrix of a BSR pattern (zeros where no block is stored). The pattern gets
    bsr_linear's checks first (a negative column would wrap around silently, one past the grid raise a bare
    IndexError)."""
    _check_pattern("bsr_to_dense", values, crow_indices, col_indices, shape)
    return _scatter_dense(values, crow_indices, col_indices, shape)


def _scatter_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]) -> Tensor:
    b = values.shape[-1]
    rows, cols = block_grid(shape, b)
    grid = values.new_zeros(rows, cols, b, b)
    grid[block_row_of(crow_indices), col_indices.to(torch.int64)] = values
    return grid.permute(0, 2, 1, 3).reshape(rows * b, cols * b)[: shape[0], : shape[1]]


def _padded_blocks(weight: Tensor, b: int) -> Tensor:
    """(Nb, Kb, b, b) view of `weight` zero-padded to whole blocks."""
    n, k = weight.shape
    rows, cols = block_grid((n, k), b)
    padded = torch.nn.functional.pad(weight, (0, cols * b - k, 0, rows * b - n))
    return padded.reshape(rows, b, cols, b).permute(0, 2, 1, 3)


class BlockSparseMatrix:
    """A (N, K) matrix stored as b x b blocks (BSR); `.values` may be an nn.Parameter.

    Build one with `from_dense` (magnitude block pruning or a given mask) or `from_torch_bsr`.
    The constructor checks the index arrays (clear errors); so do the ops and every method that reads them,
    as they may be edited in place later (never an out-of-bounds read).
    """

    def __init__(self, values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]):
        op = "BlockSparseMatrix"
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
                and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"{op}: shape must be (out_features, in_features), two ints >= 1; got {shape!r}")
        shape = (int(shape[0]), int(shape[1]))
        # values named as values (the op's check below would call it by the op's names)
        _validate._tensor(op, "values", values, dtypes=_validate.FLOAT_DTYPES)
        # Integer indices only, checked before they are narrowed to int32 (a float 2.7 would truncate to
        # 2, an int64 2^32 + 3 wrap to 3). int64 goes through the check as it is: any value it accepts
        # lies in [0, nnzb] or [0, Kb), so the narrowing after it is exact.
        _validate._tensor(op, "crow_indices", crow_indices, ndim=1, dtypes=_validate.INDEX_DTYPES)
        _validate._tensor(op, "col_indices", col_indices, ndim=1, dtypes=_validate.INDEX_DTYPES)
        if crow_indices.dtype != col_indices.dtype:
            crow_indices, col_indices = crow_indices.to(torch.int64), col_indices.to(torch.int64)
        _check_pattern(op, values, crow_indices, col_indices, shape)
        self.values = values
        self.crow_indices = crow_indices.to(torch.int32)
        self.col_indices = col_indices.to(torch.int32)
        self.shape = shape

    @classmethod
    def _unchecked(cls, values, crow_indices, col_indices, shape) -> BlockSparseMatrix:
        """A matrix over the given leaves as they are: pytree unflatten, whose leaves may be anything a
        tree_map returns (None grads, other dtypes), so neither checked nor narrowed."""
        matrix = cls.__new__(cls)
        matrix.values, matrix.crow_indices, matrix.col_indices = values, crow_indices, col_indices
        matrix.shape = shape
        return matrix

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: Tensor, block_size: int = 32, sparsity: float | None = None,
                   mask: Tensor | None = None) -> BlockSparseMatrix:
        """Keep the blocks of `weight` (N, K) with the largest Frobenius norm, or those `mask` names.

        sparsity: fraction of blocks dropped, in [0, 1] (round((1 - sparsity) * Nb * Kb) blocks kept, Python's
        round: half to even, so 0.5 of 1 block keeps none and 0.5 of 3 keeps 2; equal norms go to the lower
        block index). mask: a block mask (Nb, Kb), or an element mask (N, K) such
        as torch.nn.utils.prune leaves (a block is kept if any element is; elements it zeroes stay
        zero, so to_dense() == weight * mask exactly). With neither, every block is kept.
        """
        op = "BlockSparseMatrix.from_dense"
        _validate._tensor(op, "weight", weight, ndim=2, dtypes=_validate.FLOAT_DTYPES)
        _validate._int(op, "block_size", block_size, 1)
        n, k = weight.shape
        if n < 1 or k < 1:
            raise ValueError(f"{op}: weight must be non-empty; got shape {tuple(weight.shape)}")
        if sparsity is not None and mask is not None:
            raise ValueError(f"{op}: give sparsity or mask, not both")
        weight = weight.detach()
        rows, cols = block_grid((n, k), block_size)
        if mask is not None:
            _validate._tensor(op, "mask", mask, ndim=2)
            if tuple(mask.shape) == (n, k):
                weight = weight * mask.to(weight.dtype)
                nonzero = (mask != 0).to(torch.float32)
                keep = _padded_blocks(nonzero, block_size).flatten(2).amax(-1) > 0
            elif tuple(mask.shape) == (rows, cols):
                keep = mask.to(torch.bool)
            else:
                raise ValueError(f"{op}: mask must have shape (Nb, Kb) = {(rows, cols)} (block mask) or "
                                 f"(N, K) = {(n, k)} (element mask); got {tuple(mask.shape)}")
            keep = keep.to(weight.device)
        else:
            if sparsity is None:
                kept = rows * cols
            else:
                if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
                        or not 0.0 <= sparsity <= 1.0:
                    raise ValueError(f"{op}: sparsity must be a float in [0, 1]; got {sparsity!r}")
                kept = round((1.0 - sparsity) * rows * cols)
            if weight.device.type == "meta":
                # No norms to rank blocks by: a meta matrix of the size this pruning keeps, as a module built on
                # meta needs (its pattern comes with the checkpoint: load_state_dict(..., assign=True)).
                return cls(weight.new_empty(kept, block_size, block_size),
                           torch.empty(rows + 1, dtype=torch.int32, device="meta"),
                           torch.empty(kept, dtype=torch.int32, device="meta"), (n, k))
            norms = _padded_blocks(weight.to(torch.float64), block_size).pow(2).sum((-1, -2)).flatten()
            order = torch.sort(norms, descending=True, stable=True).indices[:kept]
            keep = torch.zeros(rows * cols, dtype=torch.bool, device=weight.device)
            keep[order] = True
            keep = keep.view(rows, cols)
        return cls.from_block_mask(weight, keep, block_size)

    @classmethod
    def from_block_mask(cls, weight: Tensor, keep: Tensor, block_size: int) -> BlockSparseMatrix:
        """The blocks of `weight` where the (Nb, Kb) bool mask `keep` is True."""
        op = "BlockSparseMatrix.from_block_mask"
        _validate._tensor(op, "weight", weight, ndim=2, dtypes=_validate.FLOAT_DTYPES)
        _validate._int(op, "block_size", block_size, 1)
        _validate._tensor(op, "keep", keep, dtypes=(torch.bool,))  # a float mask's sum would count fractions
        _validate._shape(op, "keep", keep, block_grid(tuple(weight.shape), block_size), "(Nb, Kb) = ")
        if weight.device.type == "meta" or keep.device.type == "meta":
            raise ValueError(f"{op}: the pattern is read from `keep` (or, in from_dense, the weights' block "
                             "norms), which a meta tensor does not hold; build the matrix on a real device "
                             "(or construct BlockSparseMatrix(values, crow_indices, col_indices, shape) on "
                             "meta from a known pattern)")
        blocks = _padded_blocks(weight.detach(), block_size)
        block_rows, block_cols = keep.nonzero(as_tuple=True)  # row-major: canonical BSR order
        counts = keep.sum(1)
        crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = counts.cumsum(0)
        values = blocks[block_rows, block_cols].contiguous()
        return cls(values, crow, block_cols.to(torch.int32), tuple(weight.shape))

    @classmethod
    def from_torch_bsr(cls, tensor: Tensor, shape: tuple[int, int] | None = None) -> BlockSparseMatrix:
        """From a torch.sparse_bsr tensor; `shape` crops it to a smaller logical shape (padding)."""
        if not isinstance(tensor, Tensor) or tensor.layout != torch.sparse_bsr:
            raise TypeError("BlockSparseMatrix.from_torch_bsr: tensor must be a torch.sparse_bsr tensor; "
                            f"got {getattr(tensor, 'layout', type(tensor).__name__)}")
        values = tensor.values()
        if tensor.dim() != 2 or values.dim() != 3:
            raise ValueError("BlockSparseMatrix.from_torch_bsr: tensor must be a plain 2-D BSR matrix (no batch "
                             f"or dense dimensions); got shape {tuple(tensor.shape)} with values of shape "
                             f"{tuple(values.shape)}")
        if values.shape[1] != values.shape[2]:
            raise ValueError("BlockSparseMatrix.from_torch_bsr: blocks must be square; got values of shape "
                             f"{tuple(values.shape)}")
        full = tuple(tensor.shape)
        if shape is not None and not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2):
            raise ValueError("BlockSparseMatrix.from_torch_bsr: shape must be (out_features, in_features), two ints "
                             f">= 1, or None (the tensor's); got {shape!r}")
        shape = full if shape is None else tuple(shape)
        b = values.shape[1]
        if block_grid(shape, b) != (full[0] // b, full[1] // b):
            raise ValueError(f"BlockSparseMatrix.from_torch_bsr: shape {shape} must round up to the "
                             f"tensor's {full} in blocks of {b}")
        return cls(values, tensor.crow_indices(), tensor.col_indices(), shape)

    # -- views ------------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.values.shape[-1]

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        rows, cols = block_grid(self.shape, self.block_size)
        return self.nnzb / (rows * cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def _check(self, op: str) -> None:
        """The index data again: it may have been edited in place since construction, or loaded unchecked
        (torch.load rebuilds the object without calling __init__)."""
        _check_pattern(f"BlockSparseMatrix.{op}", self.values, self.crow_indices, self.col_indices, self.shape)

    def block_mask(self) -> Tensor:
        """(Nb, Kb) bool: which blocks are stored."""
        self._check("block_mask")
        keep = torch.zeros(block_grid(self.shape, self.block_size), dtype=torch.bool, device=self.device)
        keep[block_row_of(self.crow_indices), self.col_indices.to(torch.int64)] = True
        return keep

    def to_dense(self) -> Tensor:
        self._check("to_dense")
        return _scatter_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    def to_torch_bsr(self) -> Tensor:
        """A torch.sparse_bsr tensor; its shape is padded up to whole blocks (torch requires that)."""
        self._check("to_torch_bsr")  # check_invariants=False below: torch's kernels would read out of bounds
        rows, cols = block_grid(self.shape, self.block_size)
        b = self.block_size
        return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values.detach(),
                                       size=(rows * b, cols * b), check_invariants=False)

    def to(self, *args, **kwargs) -> BlockSparseMatrix:
        """Values follow Tensor.to(...) (device and dtype); indices follow the device only, and copy=True
        copies them too."""
        values = self.values.to(*args, **kwargs)
        copy = bool(kwargs.get("copy", False))
        crow, col = (t.to(values.device, copy=copy) for t in (self.crow_indices, self.col_indices))
        return BlockSparseMatrix(values, crow, col, self.shape)

    def __repr__(self) -> str:
        return (f"BlockSparseMatrix(shape={self.shape}, block_size={self.block_size}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")


def _check_pattern(op: str, values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape) -> None:
    """The checks bsr_linear runs on a weight (container, then index data), with an empty probe input."""
    probe = values.new_empty((0, shape[1]))
    _validate.bsr_linear(op, probe, values, crow_indices, col_indices, shape[0], shape[1], None,
                         data=_validate.index_data_readable(values))


# A pytree node (children: the three tensors; context: the logical shape), so a matrix can be an input or
# output of torch.compile / torch.export and tree_map reaches its tensors.
_FIELDS = ("values", "crow_indices", "col_indices")
pytree.register_pytree_node(
    BlockSparseMatrix,
    lambda m: ([m.values, m.crow_indices, m.col_indices], m.shape),
    lambda leaves, shape: BlockSparseMatrix._unchecked(*leaves, shape),
    serialized_type_name="amnets_kernels.BlockSparseMatrix",
    # The shape through JSON as a list, back as the tuple the live treespec holds (specs compare equal).
    to_dumpable_context=lambda shape: json.dumps(list(shape)),
    from_dumpable_context=lambda text: tuple(json.loads(text)),
    flatten_with_keys_fn=lambda m: ([(pytree.GetAttrKey(f), getattr(m, f)) for f in _FIELDS], m.shape),
)


# torch.load's default (weights_only=True) rebuilds only allowlisted classes: a saved matrix loads as its
# tensors and shape (its index data is checked by every kernel call that reads it, not trusted).
torch.serialization.add_safe_globals([BlockSparseMatrix])


# ---------------------------------------------------------------------------------------------------
# Low-rank factors


def _svd_input(op: str, weight: Tensor) -> Tensor:
    """`weight` (2-D, floating, finite) detached in float64, as the SVDs below take it."""
    _validate._tensor(op, "weight", weight, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    if weight.device.type == "meta":
        raise ValueError(f"{op}: weight is on the meta device, which holds no values to decompose; pass the "
                         "weight on a real device")
    if weight.numel() == 0:
        raise ValueError(f"{op}: weight must be non-empty; got shape {tuple(weight.shape)}")
    weight = weight.detach().to(torch.float64)
    if not torch.isfinite(weight).all():
        raise ValueError(f"{op}: weight must be finite (its singular values are not defined otherwise)")
    return weight


def lowrank_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: U (N, rank), V (rank, K) with U @ V the best rank-`rank` approximation of weight.

    The singular values are split evenly (sqrt into each side) so both factors have similar scale.
    """
    op = "lowrank_factors"
    weight64 = _svd_input(op, weight)
    _validate._int(op, "rank", rank, 1)
    if rank > min(weight.shape):
        raise ValueError(f"{op}: rank must be <= min(weight.shape) = {min(weight.shape)}; got {rank}")
    u, s, vh = torch.linalg.svd(weight64, full_matrices=False)
    root = s[:rank].sqrt()
    return ((u[:, :rank] * root).to(weight.dtype).contiguous(),
            (root[:, None] * vh[:rank]).to(weight.dtype).contiguous())


def rank_for_energy(weight: Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep `energy` (in (0, 1]) of sum(sigma^2); 1 for a zero matrix."""
    op = "rank_for_energy"
    weight = _svd_input(op, weight)
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0.0 < energy <= 1.0:
        raise ValueError(f"{op}: energy must be a number in (0, 1]; got {energy!r}")
    s = torch.linalg.svdvals(weight)
    if not s[0] > 0:  # a zero matrix: rank 1 (zero factors) keeps all of its (zero) energy
        return 1
    s2 = (s / s[0]).pow(2)  # scaled first: squares of 1e200 overflow and of 1e-200 vanish in float64
    kept = s2.cumsum(0) / s2.sum()
    return min(int(torch.searchsorted(kept, torch.tensor(energy * (1 - 1e-12), dtype=kept.dtype))) + 1,
               s2.numel())


__all__ = ["BlockSparseMatrix", "bsr_to_dense", "block_grid", "block_row_of", "lowrank_factors",
           "rank_for_energy"]
