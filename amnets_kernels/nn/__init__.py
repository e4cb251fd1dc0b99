"""Drop-in modules built on the amnets ops."""

from .bsr import BlockSparseLinear
from .lowrank_lstm import LowRankLSTM
from .rnnt import FusedJointRNNTLoss, RNNTLoss

__all__ = ["BlockSparseLinear", "FusedJointRNNTLoss", "LowRankLSTM", "RNNTLoss"]
