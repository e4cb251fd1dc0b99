"""python -m benchmarks.checks_cost [--against DIR]: what the per-call argument and index checks cost on
the paths users run, optionally against another checkout of this repository (A/B).

Rows (1 thread, fp32, B=1 unless said; microseconds per call, the mean over a timed loop):
  bsr_linear 4096x2048 b=32 d=0.25, M=1 and M=16   ak.bsr_linear under no_grad (the public eager path)
  bsr_linear 32x32, M=1                            the same on a tiny matrix: host cost only
  PreparedBsrLstmCell H=192 D=240 b=32 d=0.2       one streaming LSTM step of the pruned branch
  stream frame H=192 x2, sparse / lowrank           AmNetsEncoder.stream, one frame per call, arbitrated
  pattern check, 2,048 / 16,384 blocks             the compiled index check alone (every CPU kernel runs it),
                                                   called from Python (~2.5 us of the figure is that call)
  bsr_linear 4096x2048 b=16 d=0.5 M=1              the op whose 16,384 blocks that check guards

--against DIR: the same rows in another checkout, alternating (benchmarks/ab.py).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_call_us(fn, seconds: float = 0.4) -> float:
    for _ in range(20):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn()
        calls += 10
    return (time.perf_counter() - start) / calls * 1e6


def measure() -> dict:
    import torch

    import amnets_kernels as ak
    from amnets.encoder import AmNetsEncoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = {}
    with torch.no_grad():
        big = ak.BlockSparseMatrix.from_dense(torch.randn(4096, 2048), block_size=32, sparsity=0.75)
        for m in (1, 16):
            x = torch.randn(m, 2048)
            rows[f"bsr_linear 4096x2048 b=32 d=0.25 M={m}"] = per_call_us(lambda: ak.bsr_linear(x, big))
        tiny, x = ak.BlockSparseMatrix.from_dense(torch.randn(32, 32), block_size=32, sparsity=0.0), torch.randn(1, 32)
        rows["bsr_linear 32x32 M=1"] = per_call_us(lambda: ak.bsr_linear(x, tiny))
        cell_w = ak.BlockSparseMatrix.from_dense(torch.randn(768, 432), block_size=32, sparsity=0.8)
        step, xs, h, c = ak.PreparedBsrLstmCell(cell_w), torch.randn(1, 240), torch.zeros(1, 192), torch.zeros(1, 192)
        rows["PreparedBsrLstmCell H=192 D=240 b=32 d=0.2"] = per_call_us(lambda: step(xs, h, c))
        for cheap in ("sparse", "lowrank"):
            enc = AmNetsEncoder(240, 192, num_layers=2, cheap=cheap, sparsity=0.8, block_size=32, rank=48).eval()
            frame, state = torch.randn(1, 1, 240), [None]

            def one_frame():
                _, state[0], _ = enc.stream(frame, state[0])

            rows[f"stream frame H=192 x2 {cheap}"] = per_call_us(one_frame)
        check = getattr(getattr(torch.ops, "amnets_native"), "bsr_check_pattern", None)
        b16 = ak.BlockSparseMatrix.from_dense(torch.randn(4096, 2048), block_size=16, sparsity=0.5)
        if check is not None:  # an older checkout has no such op (A/B)
            for w, b in ((big, 32), (b16, 16)):
                rows[f"pattern check, {w.nnzb} blocks"] = per_call_us(
                    lambda w=w, b=b: check(w.crow_indices, w.col_indices, w.nnzb, b, 4096, 2048, "x"))
        x1 = torch.randn(1, 2048)
        rows["bsr_linear 4096x2048 b=16 d=0.5 M=1"] = per_call_us(lambda: ak.bsr_linear(x1, b16))
    return rows


if __name__ == "__main__":  # an A/B run's measuring processes load measure() from this file (benchmarks/ab.py)
    sys.path.append(HERE)
    from benchmarks import ab

    ab.main(__doc__, __file__, measure)
