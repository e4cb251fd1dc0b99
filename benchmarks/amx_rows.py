"""python -m benchmarks.amx_rows [--quick] [--threads N] [--emulate]: where AMX tiles pay, by row count (issue 17).

The bf16 kernels take AMX tiles from fixed row counts: bsr_linear's forward from 8 rows (csrc/cpu/bsr.cpp
kDpbf16MinRows: the tile path, AMX or AVX512-BF16), its backward from 48 (kAmxBackwardMinRows: 16 until this
script ran on an Intel Xeon, where the tiles' backward lost at 16-32 rows), the low-rank LSTM's and the frame
engine's recurrent products from 8 (csrc/cpu/row_products.cpp kAmxMinRows). This times each op at row counts around those with the tiles on
("auto") and off (the AVX512-BF16 kernels, or fp32 FMAs on widened weights without them), interleaved rounds,
and prints time on / time off: below 1 the tiles pay. Below a threshold both settings run the same code (the
ratio is ~1 by construction, a check on the noise). One weight set, so the rows say whether it fits the cache.

On a CPU without AMX it says so and exits; --emulate compares the scalar emulation of the tiles instead (tests
only: it checks this script runs, its times mean nothing).
"""

from __future__ import annotations

import statistics

import torch

import amnets_kernels as ak
from amnets_kernels import _backend

from .__main__ import cpu_model
from .bsr import cache_bytes, residency
from .frame_engine import interleaved
from .harness import at_least, command_line


def with_tiles(mode: str, fn):
    def call():
        _backend._C.set_cpu_amx(mode)
        return fn()

    return call


def cases(quick: bool):
    """(label, weight bytes, rows -> a call), bf16 everywhere."""
    n, k, block, density = (128, 128, 32, 0.5) if quick else (4096, 2048, 32, 0.25)
    torch.manual_seed(0)
    weight = ak.BlockSparseMatrix.from_dense(torch.randn(n, k), block_size=block, sparsity=1 - density)
    weight = weight.to(dtype=torch.bfloat16)
    values = weight.values.detach().requires_grad_()
    trained = ak.BlockSparseMatrix(values, weight.crow_indices, weight.col_indices, weight.shape)
    kept = weight.values.numel() * 2

    def forward(m):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        return lambda: ak.bsr_linear(x, weight)

    def forward_backward(m):
        x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(m, n, dtype=torch.bfloat16)
        # autograd.grad, not backward(): no accumulation into .grad inside the timed call
        return lambda: torch.autograd.grad(ak.bsr_linear(x, trained), (x, values), grad)

    h, r, steps = (64, 32, 4) if quick else (1024, 256, 20)  # panels (and tiles) from 4 steps
    factors = [t.bfloat16() * 0.05 for t in (torch.randn(4 * h, r), torch.randn(r, h), torch.randn(4 * h, r),
                                             torch.randn(r, h), torch.randn(4 * h))]

    def lstm(m):
        x = torch.randn(steps, m, h, dtype=torch.bfloat16)

        @torch.no_grad()
        def call():
            return ak.lowrank_lstm_sequence(x, None, None, *factors)

        return call

    lstm_bytes = sum(t.numel() * 2 for t in factors[2:4])
    return [(f"bsr_linear {n}x{k} b={block} d={density} forward", kept, forward),
            (f"bsr_linear {n}x{k} b={block} d={density} forward+backward", kept, forward_backward),
            (f"lowrank_lstm_sequence H=D={h} r={r} T={steps} forward (recurrent factors)", lstm_bytes, lstm)]


def main() -> None:
    parser = command_line(__doc__, "benchmarks.amx_rows")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round: a smoke run")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--emulate", action="store_true", help="the scalar emulation as 'on' (tests only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = ak.build_info()
    on = "emulate" if args.emulate else "auto"
    print(f"# AMX tiles by row count: {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}; "
          f"bf16 kernels: bsr_linear {info['cpu_bf16_bsr_kernel']!r}, LSTM {info['cpu_bf16_lowrank_lstm_kernel']!r}\n")
    if not args.emulate and info["cpu_bf16_bsr_kernel"] != "amx tiles":
        print("This CPU (or its OS) offers no AMX tiles: nothing to compare. (--emulate runs the scalar emulation, "
              "to check this script.)")
        return
    rounds, seconds = (1, 0.01) if args.quick else (5, 0.2)
    rows = (8, 16) if args.quick else (4, 8, 12, 16, 24, 32, 48, 64)
    caches = cache_bytes()
    print(f"Rows: time with the tiles {'emulated' if args.emulate else 'on'} / off (AVX512-BF16 or widened fp32), "
          f"median of {rounds} interleaved rounds; µs with the tiles on and off.\n")
    print("| op (weights) | rows | on µs | off µs | on / off |\n|---|---|---|---|---|")
    try:
        for label, nbytes, make in cases(args.quick):
            where = f"{nbytes / 2**20:.1f} MB, {residency(nbytes, caches)}"
            for m in rows:
                call = make(m)
                times = interleaved({"on": with_tiles(on, call), "off": with_tiles("off", call)}, rounds, seconds)
                ratio = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
                print(f"| {label} ({where}) | {m} | {statistics.median(times['on']):.1f} | "
                      f"{statistics.median(times['off']):.1f} | {ratio:.3f} |")
    finally:
        _backend._C.set_cpu_amx("auto")


if __name__ == "__main__":
    main()
