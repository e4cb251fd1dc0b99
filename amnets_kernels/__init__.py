"""amnets-kernels: block-sparse, low-rank LSTM and fused RNN-T kernels for Amortized Neural Networks.

Ops (each also as torch.ops.amnets.<name>, with autograd, fake impls and torch.compile support):
  bsr_linear, lowrank_lstm_cell, lowrank_lstm_sequence, rnnt_loss, fused_joint_rnnt_loss
PreparedBsrLinear / PreparedLowrankLstmCell / PreparedBsrLstmCell: streaming steps with their weights checked
once, for many inference calls at a few microseconds of host cost each (the last one fuses a whole
block-sparse LSTM step into one call on the CPU).
Faces: "reference" (pure PyTorch), "cpu" (C++), "triton", "cuda" (CUDA C++); choose with
set_backend / use_backend / AMNETS_BACKEND, inspect with available_backends / which_face / last_face.
set_label_checks / AMNETS_LABEL_CHECKS: where the RNN-T losses check labels (host on CPU, device on CUDA).
weights_changed(): after editing weights in a way no version counter records (`.data` in place, `.numpy()`).
"""

__version__ = "0.1.0"

from ._backend import (  # noqa: E402
    BACKENDS,
    FaceUnavailableError,
    FallbackWarning,
    available_backends,
    build_info,
    get_backend,
    get_label_checks,
    last_face,
    set_backend,
    set_label_checks,
    unavailable_reason,
    use_backend,
    which_face,
)
from ._ops.bsr import PreparedBsrLinear, PreparedBsrLstmCell, bsr_linear  # noqa: E402
from ._ops.lowrank_lstm import PreparedLowrankLstmCell, lowrank_lstm_cell, lowrank_lstm_sequence  # noqa: E402
from ._ops.rnnt import fused_joint_rnnt_loss, rnnt_loss  # noqa: E402
from .formats import BlockSparseMatrix, lowrank_factors, rank_for_energy  # noqa: E402
from . import nn  # noqa: E402  (amnets_kernels.nn: the drop-in modules)
from .swap import SwapReport, swap_in, swap_like, unswap  # noqa: E402
from ._weights import weights_changed  # noqa: E402

__all__ = [
    "BACKENDS", "BlockSparseMatrix", "FaceUnavailableError", "FallbackWarning", "available_backends",
    "bsr_linear", "build_info", "fused_joint_rnnt_loss", "get_backend", "get_label_checks", "last_face", "lowrank_factors",
    "lowrank_lstm_cell", "lowrank_lstm_sequence", "nn", "PreparedBsrLinear", "PreparedBsrLstmCell",
    "PreparedLowrankLstmCell", "rank_for_energy", "rnnt_loss", "set_backend", "set_label_checks",
    "SwapReport", "swap_in", "swap_like", "unavailable_reason", "unswap", "use_backend", "weights_changed", "which_face",
]
