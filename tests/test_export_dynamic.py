"""torch.export with a dynamic batch through the C++ composite ops (csrc/bsr.cpp's bsr_linear on a 3-D input,
csrc/lowrank_lstm.cpp's lowrank_lstm_sequence with h0 = None): they read sizes as SymInts, so the batch stays
symbolic instead of being specialised to the example's (an export error), and the exported program equals
eager mode at batch sizes other than the example's."""

import torch
from torch import nn

import amnets_kernels as ak
from conftest import DEVICE


class Acoustic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = ak.nn.LowRankLSTM(12, 16, rank=4, batch_first=True)
        self.output = ak.nn.BlockSparseLinear(16, 24, block_size=8, sparsity=0.5)

    def forward(self, x):  # x (B, T, 12)
        hidden, _ = self.lstm(x)  # no hx: the op's zero state, (B, H) from x's batch
        return self.output(hidden)  # (B, T, 16): bsr_linear's rows view and back


def test_export_with_dynamic_batch_equals_eager():
    torch.manual_seed(0)
    model = Acoustic().to(DEVICE).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(3, 7, 12, device=DEVICE),), dynamic_shapes=({0: batch},))
    ops = {str(node.target) for node in program.graph.nodes}
    assert {"amnets.lowrank_lstm_sequence.default", "amnets.bsr_linear.default"} <= ops, ops
    exported = program.module()
    for size in (5, 11):  # neither is the example's batch
        x = torch.randn(size, 7, 12, device=DEVICE)
        with torch.no_grad():
            got, want = exported(x), model(x)
        assert got.shape == (size, 7, 24)
        torch.testing.assert_close(got, want)


def test_block_sparse_lstm_exports_with_dynamic_batch():
    """BlockSparseLSTM prepares each direction's step from its pattern; under export its tensors are fake, and
    the pattern check read their index data (no fake kernel: an UnsupportedOperatorException). Tracing now
    leaves the data to the op, which checks it on every real call."""
    torch.manual_seed(0)
    model = ak.nn.BlockSparseLSTM(12, 16, num_layers=2, block_size=16, sparsity=0.5).to(DEVICE).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(7, 3, 12, device=DEVICE),), dynamic_shapes=({1: batch},))
    assert "amnets.bsr_linear.default" in {str(node.target) for node in program.graph.nodes}
    exported = program.module()
    for size in (5, 11):
        x = torch.randn(7, size, 12, device=DEVICE)
        with torch.no_grad():
            got, want = exported(x), model(x)
        torch.testing.assert_close(got, want)
