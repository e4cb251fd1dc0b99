"""What a layer costs (multiply-adds per frame or row), and the warning for a replacement that does not pay.

A drop-in module is only worth having when it is cheaper than the dense layer it stands for; one that is
not (a rank too high, a pruning that keeps every padded block or none) is legal but never silent.
"""

from __future__ import annotations

import warnings


class NotCheaperWarning(UserWarning):
    """A block-sparse or low-rank module that is degenerate or costs no less than its dense counterpart."""


class SmallLayerWarning(UserWarning):
    """swap_in replaced layers so small that the new module's per-call host cost may outweigh its saving."""


# Dense multiply-adds per row under which a BlockSparseLinear call can cost more time than nn.Linear's at a few
# rows: its way through the dispatcher and the pattern's checks (python -m benchmarks.overhead, one AMD EPYC core,
# eval, no grad: a 128 x 128 layer at sparsity 0.75 took 1.07-1.27x nn.Linear's time at 1 and 30 rows, 256 x 256
# 0.84-0.85x at 1 row and 0.62x at 4).
SMALL_LINEAR_MACS = 1 << 15  # (128 x 128, 16K, was slower; 256 x 256, 64K, faster; between, not measured)


def lstm_macs(input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
              proj_size: int = 0) -> int:
    """Multiply-adds per frame of a dense nn.LSTM with these settings (gates and projection; no pointwise)."""
    dirs, out = 1 + bool(bidirectional), proj_size or hidden_size
    total = 0
    for layer in range(num_layers):
        d = input_size if layer == 0 else dirs * out
        total += dirs * (4 * hidden_size * (d + out) + proj_size * hidden_size)
    return total


def why_not_cheaper(macs: int, dense_macs: int, kept_blocks: int | None = None) -> str | None:
    """Why a replacement does not pay (a sentence), or None when it does."""
    if kept_blocks == 0:
        return "the pruning keeps no block (the output would be the bias alone)"
    if macs >= dense_macs:
        return f"{macs:,} MACs per frame, no fewer than the dense layer's {dense_macs:,}"
    return None


def warn_if_not_cheaper(module, macs: int, dense_macs: int, kept_blocks: int | None = None) -> None:
    reason = why_not_cheaper(macs, dense_macs, kept_blocks)
    if reason is not None:
        warnings.warn(f"{type(module).__name__}: {reason}; it is not a saving (lower the rank / raise the "
                      "sparsity, or keep the dense layer)", NotCheaperWarning, stacklevel=3)
