"""Drop-in modules built on the amnets ops."""

from .bsr import BlockSparseLinear, BlockSparseLSTM
from .cost import NotCheaperWarning, SmallLayerWarning
from .lowrank_lstm import LowRankLSTM, LowRankLSTMCell
from .rnnt import FusedJointRNNTLoss, RNNTLoss

__all__ = ["BlockSparseLinear", "BlockSparseLSTM", "FusedJointRNNTLoss", "LowRankLSTM", "LowRankLSTMCell",
           "NotCheaperWarning", "RNNTLoss", "SmallLayerWarning"]
