"""python -m benchmarks.dense_rows [--threads N]: dense 4096x2048 fp32 products of a few rows, ours against
MKL (F.linear), by number of rows: where the frame engine's full branch stops using its own kernel and calls
ATen's GEMM (kGemmRows in csrc/cpu/frame_engine.cpp). Two of our kernels: bsr_linear at density 1
(csrc/cpu/bsr.cpp) and the frame engine's full branch (csrc/cpu/frame_engine.cpp), timed as a whole frame
of a 1-layer AmNets encoder with input 1024 and H=1024, whose [W_ih | W_hh] is 4096x2048 (force="full", one
frame per call: the product plus the LSTM update). Medians of 3 interleaved rounds, each the mean over a
~0.3 s loop; one weight set (32 MB: streamed from DRAM on a 32 MB-L3 machine)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import amnets_kernels as ak
from amnets.encoder import AmNetsEncoder

from .__main__ import cpu_model
from .harness import at_least, command_line
from .contention import mean_ms


def main() -> None:
    parser = command_line(__doc__, "benchmarks.dense_rows")
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(4096, 2048)
    blocks = ak.BlockSparseMatrix.from_dense(weight, block_size=32, sparsity=0.0)
    enc = AmNetsEncoder(1024, 1024, num_layers=1, cheap="sparse", block_size=32).eval()
    print(f"# dense rows: {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| rows | F.linear (MKL) ms | bsr_linear at density 1 ms | ours / MKL | ours GMAC/s "
          "| engine full frame ms | engine / MKL | engine GMAC/s |\n|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for rows in (8, 16, 32, 48, 64, 96, 128, 192, 256):
            x = torch.randn(rows, 2048)
            frame, streamer = torch.randn(rows, 1, 1024), enc.streamer(batch=rows, force="full")
            candidates = {"mkl": lambda: F.linear(x, weight), "bsr": lambda: ak.bsr_linear(x, blocks),
                          "engine": lambda: streamer(frame)}
            times = {name: [] for name in candidates}
            for _ in range(3):
                for name, fn in candidates.items():
                    times[name].append(mean_ms(fn, 0.3))
            mkl, bsr, engine = (statistics.median(times[name]) for name in candidates)
            gmacs = rows * weight.numel() / 1e6
            print(f"| {rows} | {mkl:.2f} | {bsr:.2f} | {bsr / mkl:.2f} | {gmacs / bsr:.1f} | {engine:.2f} "
                  f"| {engine / mkl:.2f} | {gmacs / engine:.1f} |", flush=True)


if __name__ == "__main__":
    main()
