"""python -m benchmarks.overhead [--against DIR]: the host-side cost of one op call on the paths users run.

Rows (1 thread, fp32 unless a row says bf16; microseconds per call, the mean over a timed loop after a
warm-up). The 32x32 rows are host cost only (the kernel itself is ~1 us of the native op row). The fwd+bwd
rows time a whole training step of one bsr_linear at a real size, where per-call index preparation would
show. The AmNets rows time one streamed frame of a small encoder (host cost and the frame's arithmetic), the
LSTM module rows a swapped model's streaming step at that size (LowRankLSTM, BlockSparseLSTM, and nn.LSTM
stepped the same way; all three also with proj_size) and the low-rank op alone; small Linears against BlockSparseLinear, and a training step
through a small swapped LSTM (the sizes where swap_in warns that fewer MACs need not be less time). Every row
uses public entry points only (and the kernel op torch.ops.amnets_native.bsr_linear_forward), so
`--against DIR` can run the same rows in an older checkout (benchmarks/ab.py): the before/after figures.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_call_us(fn, seconds: float = 0.5, batch: int = 50) -> float:
    """Mean microseconds a call over `seconds`, after 2 * batch warm-up calls, in batches of `batch` calls."""
    for _ in range(2 * batch):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(batch):
            fn()
        calls += batch
    return (time.perf_counter() - start) / calls * 1e6


def measure() -> dict:
    import torch

    import amnets_kernels as ak

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = {}
    w = ak.BlockSparseMatrix.from_dense(torch.randn(32, 32), block_size=32, sparsity=0.0)
    x = torch.randn(1, 32)
    args = (w.values, w.crow_indices, w.col_indices, 32, 32, None)
    rows["bsr_linear 32x32 M=1: the kernel op torch.ops.amnets_native.bsr_linear_forward"] = per_call_us(
        lambda: torch.ops.amnets_native.bsr_linear_forward(x, *args))
    with torch.no_grad():
        rows["bsr_linear 32x32 M=1: ak.bsr_linear under no_grad"] = per_call_us(lambda: ak.bsr_linear(x, w))
    rows["bsr_linear 32x32 M=1: ak.bsr_linear, grad mode on, no input needs grad"] = per_call_us(
        lambda: ak.bsr_linear(x, w))
    rows["bsr_linear 32x32 M=1: torch.ops.amnets.bsr_linear, no input needs grad"] = per_call_us(
        lambda: torch.ops.amnets.bsr_linear(x, *args))
    xg, vg = x.clone().requires_grad_(True), w.values.clone().requires_grad_(True)
    rows["bsr_linear 32x32 M=1: torch.ops.amnets.bsr_linear, x and values need grad (forward)"] = per_call_us(
        lambda: torch.ops.amnets.bsr_linear(xg, vg, w.crow_indices, w.col_indices, 32, 32, None))
    prepared = ak.PreparedBsrLinear(w)
    rows["bsr_linear 32x32 M=1: ak.PreparedBsrLinear"] = per_call_us(lambda: prepared(x))

    # A whole LSTM step of H=8 on a 32x48 [W_ih | W_hh] in one fused native call.
    lstm_w = ak.BlockSparseMatrix.from_dense(torch.randn(32, 48), block_size=16, sparsity=0.0)
    step, xs, h, c = ak.PreparedBsrLstmCell(lstm_w), torch.randn(1, 40), torch.zeros(1, 8), torch.zeros(1, 8)
    with torch.no_grad():
        rows["LSTM step H=8: ak.PreparedBsrLstmCell (one fused call)"] = per_call_us(lambda: step(xs, h, c))
        # The other ops, still routed through Python (issue 13's next steps): the same tiny sizes.
        lr = (torch.randn(32, 4), torch.randn(4, 40), torch.randn(32, 4), torch.randn(4, 8))
        rows["lowrank_lstm_cell H=8 r=4 B=1: ak.lowrank_lstm_cell under no_grad"] = per_call_us(
            lambda: ak.lowrank_lstm_cell(xs, h, c, *lr))
        lr16, xs16, h16, c16 = [t.bfloat16() for t in lr], xs.bfloat16(), h.bfloat16(), c.bfloat16()
        rows["lowrank_lstm_cell H=8 r=4 B=1 bf16: ak.lowrank_lstm_cell under no_grad"] = per_call_us(
            lambda: ak.lowrank_lstm_cell(xs16, h16, c16, *lr16))
        logits = torch.randn(1, 4, 3, 5)
        targets, frames, labels = torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([4], dtype=torch.int32), \
            torch.tensor([2], dtype=torch.int32)
        rows["rnnt_loss (1, 4, 3, 5): ak.rnnt_loss under no_grad"] = per_call_us(
            lambda: ak.rnnt_loss(logits, targets, frames, labels))

    # A streamed AmNets frame (issue 12's H=192 x2 encoder, B=1, one frame a call): stream() with the state passed
    # and a stream's first chunk (state None) against the streamer (one native call, the state kept inside); the
    # frame itself is the same engine.
    from amnets.encoder import AmNetsEncoder

    with torch.no_grad():
        for cheap in ("sparse", "lowrank"):
            torch.manual_seed(0)
            enc = AmNetsEncoder(240, 192, num_layers=2, cheap=cheap, sparsity=0.8, block_size=32, rank=48).eval()
            frame = torch.randn(1, 1, 240)
            for force in ("cheap", "full"):
                state = enc.stream(frame, force=force)[1]
                rows[f"AmNets H=192 x2 {cheap} frame, forced {force}: AmNetsEncoder.stream()"] = per_call_us(
                    lambda: enc.stream(frame, state, force))
                if force == "cheap":
                    rows[f"AmNets H=192 x2 {cheap} frame, forced {force}: AmNetsEncoder.stream(), state None"] = \
                        per_call_us(lambda: enc.stream(frame, None, force))
                streamer = enc.streamer(force=force)
                rows[f"AmNets H=192 x2 {cheap} frame, forced {force}: AmNetsEncoder.streamer()"] = per_call_us(
                    lambda: streamer(frame))

        # A swapped model streaming a frame a call (swap_in's LowRankLSTM, stepped with its state) and its op at
        # that size: short factor rows (r = 48), where the row products' horizontal sums once dominated.
        # The block-sparse swap and stock nn.LSTM stepped the same way, for the ratio in one run.
        lstm = torch.nn.LSTM(240, 192, 2).eval()
        frame = torch.randn(1, 1, 240)
        state = lstm(frame)[1]
        for name, module in (("LowRankLSTM 240->192 x2 r=48", ak.nn.LowRankLSTM.from_lstm(lstm, rank=48).eval()),
                             ("BlockSparseLSTM 240->192 x2 sparsity 0.8 b=32",
                              ak.nn.BlockSparseLSTM.from_lstm(lstm, sparsity=0.8, block_size=32).eval()),
                             ("nn.LSTM 240->192 x2", lstm)):
            rows[f"{name}, T=1 B=1, with its state: the module"] = per_call_us(lambda: module(frame, state))
        # The same with a projection (nn.LSTM's proj_size: an LSTMP encoder, common on device).
        lstmp = torch.nn.LSTM(240, 192, 2, proj_size=64).eval()
        state_p = lstmp(frame)[1]
        projected = [("LowRankLSTM 240->192 x2 proj 64 r=48", ak.nn.LowRankLSTM.from_lstm(lstmp, rank=48).eval())]
        try:
            projected.append(("BlockSparseLSTM 240->192 x2 proj 64 sparsity 0.8 b=32",
                              ak.nn.BlockSparseLSTM.from_lstm(lstmp, sparsity=0.8, block_size=32).eval()))
        except ValueError:  # a checkout from before BlockSparseLSTM took proj_size (A/B): the row is left out
            pass
        for name, module in (*projected, ("nn.LSTM 240->192 x2 proj 64", lstmp)):
            rows[f"{name}, T=1 B=1, with its state: the module"] = per_call_us(lambda: module(frame, state_p))
        swapped = ak.nn.LowRankLSTM.from_lstm(lstm, rank=48).eval()
        factors = swapped.layer_weights(0)
        for b in (1, 4):
            xs, hs, cs = torch.randn(b, 240), torch.randn(b, 192), torch.randn(b, 192)
            rows[f"lowrank_lstm_cell H=192 D=240 r=48 B={b}: ak.lowrank_lstm_cell under no_grad"] = per_call_us(
                lambda: ak.lowrank_lstm_cell(xs, hs, cs, *factors))

        # Small Linears (swap_in's SmallLayerWarning): fewer MACs is not less time when the call's host cost
        # dominates. eval, no grad, as an inference model runs them.
        for size, m in ((128, 1), (128, 30), (256, 1), (256, 4)):
            dense = torch.nn.Linear(size, size).eval()
            sparse = ak.nn.BlockSparseLinear.from_dense(dense, block_size=32, sparsity=0.75).eval()
            xl = torch.randn(m, size)
            for name, module in (("nn.Linear", dense), ("BlockSparseLinear sparsity 0.75 b=32", sparse)):
                rows[f"{name} {size}x{size} M={m}: the module"] = per_call_us(lambda: module(xl))

    # Training through a swapped LSTM (swap_in warns for BlockSparseLSTM in train mode under H=512: its autograd
    # path runs a fused cell a step): forward + backward of a 2-layer H=128 stack, T=100, B=8.
    lstm = torch.nn.LSTM(128, 128, 2)
    seq = torch.randn(100, 8, 128)
    for name, module in (("nn.LSTM", lstm), ("BlockSparseLSTM sparsity 0.75 b=32",
                                               ak.nn.BlockSparseLSTM.from_lstm(lstm, sparsity=0.75, block_size=32)),
                         ("LowRankLSTM r=32", ak.nn.LowRankLSTM.from_lstm(lstm, rank=32))):
        rows[f"{name} 128->128 x2, T=100 B=8: forward + backward"] = per_call_us(
            lambda: module(seq)[0].sum().backward(), seconds=1.0, batch=2)

    big = ak.BlockSparseMatrix.from_dense(torch.randn(4096, 2048), block_size=32, sparsity=0.75)
    values = big.values.clone().requires_grad_(True)
    for m in (1, 16):
        xb = torch.randn(m, 2048, requires_grad=True)

        def train_step():
            y = torch.ops.amnets.bsr_linear(xb, values, big.crow_indices, big.col_indices, 4096, 2048, None)
            y.backward(torch.ones_like(y))

        rows[f"bsr_linear 4096x2048 b=32 d=0.25 M={m}: forward + backward (grad x, values)"] = per_call_us(
            train_step, seconds=1.0)
    return rows


if __name__ == "__main__":  # an A/B run's measuring processes load measure() from this file (benchmarks/ab.py)
    sys.path.append(HERE)
    from benchmarks import ab

    ab.main(__doc__, __file__, measure)
