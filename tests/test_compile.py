"""All five ops inside one torch.compile(fullgraph=True) graph with the default (inductor) backend:
forward and backward equal eager mode."""

import pytest
import torch

import amnets_kernels as ak

from helpers import close, rand


def test_all_ops_in_one_inductor_graph():
    torch.manual_seed(0)
    sparse = ak.BlockSparseMatrix.from_dense(rand(12, 8), block_size=4, sparsity=0.5)
    crow, col = sparse.crow_indices, sparse.col_indices
    w = [rand(12, 2, requires_grad=True), rand(2, 6, requires_grad=True), rand(12, 2, requires_grad=True),
         rand(2, 3, requires_grad=True), rand(12, requires_grad=True)]
    x = rand(4, 2, 8, requires_grad=True)
    values = sparse.values.requires_grad_(True)
    weight, bias = rand(5, 3, requires_grad=True), rand(5, requires_grad=True)
    targets, lengths, target_lengths = torch.tensor([[1, 2], [3, 4]]), torch.tensor([4, 3]), torch.tensor([2, 1])

    def model(x, values, w_ih_u, w_ih_v, w_hh_u, w_hh_v, b, weight, bias):
        feats = torch.ops.amnets.bsr_linear(x, values, crow, col, 12, 8, None)[..., :6]  # (T, B, 6)
        out, h, c = torch.ops.amnets.lowrank_lstm_sequence(feats, None, None, w_ih_u, w_ih_v, w_hh_u, w_hh_v, b)
        h1, _ = torch.ops.amnets.lowrank_lstm_cell(feats[0], h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, b)
        enc = out.transpose(0, 1)  # (B, T, 3)
        pred = torch.stack([h1, h1.flip(0), h1 * 0.5], dim=1)  # (B, U+1 = 3, 3)
        fused = torch.ops.amnets.fused_joint_rnnt_loss(enc, pred, weight, bias, targets, lengths, target_lengths,
                                                       0, "tanh", -1.0, "mean")
        logits = torch.tanh(enc[:, :, None] + pred[:, None]) @ weight.T + bias
        plain = torch.ops.amnets.rnnt_loss(logits, targets, lengths, target_lengths, 0, -1.0, "sum", True)
        return fused + 0.1 * plain

    inputs = (x, values, *w, weight, bias)
    with ak.use_backend("reference"):
        eager = model(*inputs)
        compiled = torch.compile(model, fullgraph=True)(*inputs)
        assert compiled.shape == () and torch.isfinite(compiled)
        close(compiled, eager)
        for g, e in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
            close(g, e)


@pytest.mark.filterwarnings("ignore::amnets_kernels.nn.NotCheaperWarning")  # (tiny layers)
def test_every_module_compiles_whole():
    """README: every module of amnets_kernels.nn works under torch.compile(fullgraph=True), forward and backward,
    including the paths eager mode takes through native calls, caches and face checks Dynamo cannot trace (a
    stacked LSTM stepped one frame, BlockSparseLSTM's prepared steps): traced, they run the public ops."""
    from torch import nn

    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, 2)
    targets, lengths, target_lengths = torch.tensor([[1, 2], [3, 4]]), torch.tensor([3, 2]), torch.tensor([2, 1])
    cases = [(ak.nn.LowRankLSTM.from_lstm(lstm, rank=4), lambda m, t: m(t)[0]),
             (ak.nn.BlockSparseLSTM.from_lstm(lstm, sparsity=0.5, block_size=16), lambda m, t: m(t)[0]),
             (ak.nn.LowRankLSTMCell.from_lstm_cell(nn.LSTMCell(8, 16), rank=4), lambda m, t: m(t[0])[0]),
             (ak.nn.BlockSparseLinear.from_dense(nn.Linear(8, 32), block_size=16, sparsity=0.5), lambda m, t: m(t)),
             (ak.nn.RNNTLoss(blank=0), lambda m, t: m(t.transpose(0, 1)[:, :, None].expand(2, 3, 3, 8).contiguous(),
                                                      targets, lengths, target_lengths)),
             (ak.nn.FusedJointRNNTLoss(8, 5, blank=0),
              lambda m, t: m(t.transpose(0, 1), t.transpose(0, 1).flip(1), targets, lengths, target_lengths))]
    for module, run in cases:
        for steps in (1, 3):
            if steps == 1 and isinstance(module, (ak.nn.RNNTLoss, ak.nn.FusedJointRNNTLoss)):
                continue
            torch._dynamo.reset()
            x = rand(steps, 2, 8, requires_grad=True)
            compiled = torch.compile(lambda t: run(module, t), fullgraph=True, backend="aot_eager")
            with torch.no_grad():
                close(compiled(x), run(module, x))
            got, want = compiled(x), run(module, x)
            close(got, want)
            params = [p for p in module.parameters() if p.requires_grad]
            for g, e in zip(torch.autograd.grad(got.sum(), [x, *params]), torch.autograd.grad(want.sum(), [x, *params])):
                close(g, e)


def test_the_prepared_steps_compile_whole():
    """README: the prepared steps under torch.compile go through the public op. PreparedBsrLstmCell resolved the
    face (a native call Dynamo skips) before asking whether it was traced: fullgraph failed, and without it the
    fused kernel ran eagerly behind a graph break."""
    from amnets_kernels import BlockSparseMatrix, PreparedBsrLstmCell

    torch.manual_seed(0)
    step = PreparedBsrLstmCell(BlockSparseMatrix.from_dense(rand(64, 32), block_size=16, sparsity=0.5), rand(64))
    x, h, c = rand(2, 16), rand(2, 16), rand(2, 16)
    with torch.no_grad():
        want = step(x, h, c)
        assert step.last_path == "fused"
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, h, c)
    assert step.last_path == "bsr_linear + pointwise"
    for g, w in zip(got, want):
        close(g, w)


def test_jit_trace_of_a_frame_step_records_the_ops():
    """A stacked LSTM stepped one frame, traced after eager frames had run: the kept native stack call wrote its
    results without the dispatcher, so the trace was three aten::empty and returned uninitialised memory."""
    from torch import nn

    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, 2)
    for module in (ak.nn.LowRankLSTM.from_lstm(lstm, rank=4), ak.nn.BlockSparseLSTM.from_lstm(lstm, 0.5, 16)):
        module.eval()
        x, hx = rand(1, 2, 8), (rand(2, 2, 16), rand(2, 2, 16))
        with torch.no_grad():
            module(x, hx)
            module(x, hx)  # the native stack call is kept from here
            traced = torch.jit.trace(module, (x, hx), check_trace=False)
            other = rand(1, 2, 8)
            close(traced(other, hx)[0], module(other, hx)[0])
