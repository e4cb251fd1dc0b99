"""python -m benchmarks.overhead: the host-side cost of one bsr_linear call, layer by layer, on a 32x32
matrix where the kernel itself takes ~3 us. It shows what a streaming frame pays per op call besides the
arithmetic (1 thread; microseconds, mean over 20000 calls after 200 warm-up calls)."""

import time

import torch

import amnets_kernels as ak
from amnets_kernels import _backend, _validate
from amnets_kernels._ops import bsr, eager_inference, run


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
        ("argument validation with index data (cached)", lambda: _validate.bsr_linear("bsr_linear", x, *args,
                                                                                      data=True)),
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


if __name__ == "__main__":
    main()
