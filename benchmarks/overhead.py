"""python -m benchmarks.overhead: the host-side cost of one bsr_linear call, layer by layer, on a 32x32
matrix where the kernel itself takes ~3 us, then the prepared streaming steps. It shows what a streaming frame pays per op call besides the
arithmetic (1 thread; microseconds, mean over 20000 calls after 200 warm-up calls)."""

import time

import torch

import amnets_kernels as ak
from amnets_kernels import _backend, _validate
from amnets_kernels._ops import bsr, eager_inference, run
from amnets_kernels.reference import lstm_pointwise


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    w = ak.BlockSparseMatrix.from_dense(torch.randn(32, 32), block_size=32, sparsity=0.0)
    x = torch.randn(1, 32)
    args = (w.values, w.crow_indices, w.col_indices, 32, 32, None)
    native = torch.ops.amnets_native.bsr_linear_forward
    rows = [
        ("native C++ op (the cpu face's kernel)", lambda: native(x, *args)),
        ("argument validation, shapes only", lambda: _validate.bsr_linear("bsr_linear", x, *args, data=False)),
        ("argument validation with index data (compiled check, every call on CPU)",
         lambda: _validate.bsr_linear("bsr_linear", x, *args, data=True)),
        ("face resolution", lambda: _backend.resolve("bsr_linear", x.device)),
        ("slow-path check", lambda: bsr._say_if_slow(x, w.values)),
        ("eager-inference check", lambda: eager_inference(x, w.values, None)),
        ("run(): face call on contiguous arguments", lambda: run("bsr_linear", "forward", x, *args)),
        ("torch.ops.amnets.bsr_linear (op layers + autograd wrapper)",
         lambda: torch.ops.amnets.bsr_linear(x, *args)),
    ]
    for label, fn in rows:
        print(f"{per_call_us(fn):7.1f} us  {label}")
    with torch.no_grad():
        print(f"{per_call_us(lambda: ak.bsr_linear(x, w)):7.1f} us  ak.bsr_linear under no_grad (eager path)")
    print(f"{per_call_us(lambda: ak.bsr_linear(x, w)):7.1f} us  ak.bsr_linear with autograd available")
    prepared = ak.PreparedBsrLinear(w)
    print(f"{per_call_us(lambda: prepared(x)):7.1f} us  ak.PreparedBsrLinear (weights checked once)")
    # A whole LSTM step of H=8 on a 32x48 [W_ih | W_hh]: one fused native call vs the public ops.
    lstm_w = ak.BlockSparseMatrix.from_dense(torch.randn(32, 48), block_size=16, sparsity=0.0)
    step, xs, h, c = ak.PreparedBsrLstmCell(lstm_w), torch.randn(1, 40), torch.zeros(1, 8), torch.zeros(1, 8)
    with torch.no_grad():
        print(f"{per_call_us(lambda: step(xs, h, c)):7.1f} us  ak.PreparedBsrLstmCell: an LSTM step, one fused call")
        print(f"{per_call_us(lambda: lstm_pointwise(ak.bsr_linear(torch.cat([xs, h], 1), lstm_w), c)):7.1f} us  "
              "the same step as ak.bsr_linear + the PyTorch update")


if __name__ == "__main__":
    main()
