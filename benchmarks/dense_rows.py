"""python -m benchmarks.dense_rows [--threads N]: our block kernel at density 1 against MKL (F.linear) on a
dense 4096x2048 fp32 layer, by number of rows: where the frame engine's full branch stops using its own
kernel and calls ATen's GEMM (kGemmRows in csrc/cpu/frame_engine.cpp). Medians of 3 interleaved rounds,
each the mean over a ~0.3 s loop; one weight set (32 MB: streamed from DRAM on a 32 MB-L3 machine)."""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import amnets_kernels as ak

from .__main__ import cpu_model
from .contention import mean_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(4096, 2048)
    blocks = ak.BlockSparseMatrix.from_dense(weight, block_size=32, sparsity=0.0)
    print(f"# dense rows: {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| rows | F.linear (MKL) ms | bsr_linear at density 1 ms | ours / MKL | ours GMAC/s |\n|---|---|---|---|---|")
    with torch.no_grad():
        for rows in (8, 12, 16, 24, 32, 48, 64):
            x = torch.randn(rows, 2048)
            mkl, ours = [], []
            for _ in range(3):
                mkl.append(mean_ms(lambda: F.linear(x, weight), 0.3))
                ours.append(mean_ms(lambda: ak.bsr_linear(x, blocks), 0.3))
            a, b = statistics.median(mkl), statistics.median(ours)
            print(f"| {rows} | {a:.2f} | {b:.2f} | {b / a:.2f} | {rows * weight.numel() / b / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
