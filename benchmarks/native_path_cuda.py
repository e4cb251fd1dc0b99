"""python -m benchmarks.native_path_cuda: issue 13's GPU targets, for benchmarks/gpu_suite.sh.

  bsr_linear W 4096x2048, b=32, d=0.25, fp32, M = 1 and 16, timed inside a CUDA graph (20 calls captured,
  replayed; CUDA events; the CUDA face also with AMNETS_BSR_CUDA_SPLIT=auto, its few-row kernel with each
  block row's blocks split over a CTA's warps), against cuBLAS dense F.linear captured the same way (target
  <= 0.4x), with the bandwidth on the bytes the op must read (target >= 70% of HBM); the host time of one eager
  call (launch only, no sync between calls; target <= 15 us); whether rnnt_loss and bsr_linear run under
  torch.cuda.set_sync_debug_mode("error") (no host sync; rnnt_loss checks its labels on the device since
  2026-11-29), and fused_joint_rnnt_loss fwd+bwd on a padded batch (its CUDA face's at::nonzero sync removed
  2026-12-04); rnnt_loss (16, 100, 30, 512) fwd+bwd eager and inside a CUDA graph against torchaudio eager
  (target >= 2x torchaudio's speed); where an eager rnnt_loss call's host time goes (torch.profiler over 5
  calls: kernels and aten ops a call, the ops with the most host time).
Every row runs on each GPU face that is there ("cuda", the C++ one issue 13 is about, then "triton"), each
labelled; a face that is not there says why. Each measurement runs on its own: one that fails prints its
error and the others still run.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback

import torch
import torch.nn.functional as F

import amnets_kernels as ak

from .harness import command_line


def graph_us(fn, calls: int = 20, replays: int = 20) -> float:
    """Microseconds per call of fn, captured `calls` times in one CUDA graph, median over replays."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up: caches (the pattern check), workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def eager_us(fn, calls: int = 20) -> float:
    """Microseconds per call of fn run eagerly `calls` times between two CUDA events, median of 5."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def split_setting(value: str):
    """AMNETS_BSR_CUDA_SPLIT (csrc/cuda/bsr.cu, read per call) set to value inside the block."""
    before = os.environ.get("AMNETS_BSR_CUDA_SPLIT")
    os.environ["AMNETS_BSR_CUDA_SPLIT"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["AMNETS_BSR_CUDA_SPLIT"]
        else:
            os.environ["AMNETS_BSR_CUDA_SPLIT"] = before


def run(label: str, fn) -> None:
    try:
        print(f"{label}: {fn()}")
    except Exception:  # noqa: BLE001 - report and go on: every row is worth having
        print(f"{label}: FAILED\n{traceback.format_exc(limit=3)}")


def main(argv=None) -> None:
    command_line(__doc__, "benchmarks.native_path_cuda").parse_args(argv)
    if not torch.cuda.is_available():
        print("native_path_cuda: no CUDA GPU; nothing to measure")
        return
    faces = []
    for face in ("cuda", "triton"):
        reason = ak.unavailable_reason("bsr_linear", face, "cuda")
        if reason is None:
            faces.append(face)
        else:
            print(f"{face} face: not measured ({reason})")
    for face in faces:
        with ak.use_backend(face):
            measure(f"[{face}] ")


def measure(tag: str) -> None:
    torch.manual_seed(0)
    dense = torch.randn(4096, 2048, device="cuda")
    weight = ak.BlockSparseMatrix.from_dense(dense, 32, sparsity=0.75)
    for m in (1, 16):
        x = torch.randn(m, 2048, device="cuda")
        read = weight.values.numel() * 4 + weight.col_indices.numel() * 4 + x.numel() * 4 + m * 4096 * 4

        def ratio(x=x, read=read):
            ours = graph_us(lambda: ak.bsr_linear(x, weight))
            cublas = graph_us(lambda: F.linear(x, dense))
            return (f"ours {ours:.2f} us, cuBLAS dense {cublas:.2f} us, ratio {ours / cublas:.3f} (target <= 0.4); "
                    f"{read / ours / 1e3:.0f} GB/s on the {read / 1e6:.1f} MB it reads")

        run(f"{tag}bsr_linear 4096x2048 b=32 d=0.25 M={m}, CUDA graph", ratio)
        if tag == "[cuda] ":  # the few-row kernel with each block row's blocks split over a CTA's warps
            with split_setting("auto"):
                run(f"{tag}bsr_linear 4096x2048 b=32 d=0.25 M={m}, CUDA graph, AMNETS_BSR_CUDA_SPLIT=auto", ratio)
        run(f"{tag}bsr_linear M={m}, host time of one eager call (us, target <= 15)",
            lambda x=x: f"{host_us(lambda: ak.bsr_linear(x, weight)):.1f}")
    x = torch.randn(16, 2048, device="cuda")

    def no_sync(fn):
        fn()  # warm-up: a first call may allocate workspaces or compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            return "no host sync"
        finally:
            torch.cuda.set_sync_debug_mode(0)

    run(f"{tag}bsr_linear forward under sync debug mode 'error'", lambda: no_sync(lambda: ak.bsr_linear(x, weight)))
    logits = torch.randn(16, 100, 31, 512, device="cuda", requires_grad=True)
    targets = torch.randint(1, 512, (16, 30), device="cuda", dtype=torch.int32)
    frames = torch.full((16,), 100, device="cuda", dtype=torch.int32)
    labels = torch.full((16,), 30, device="cuda", dtype=torch.int32)
    run(f"{tag}rnnt_loss fwd+bwd under sync debug mode 'error'",
        lambda: no_sync(lambda: ak.rnnt_loss(logits, targets, frames, labels, blank=0).backward()))
    enc, pred = (torch.randn(8, n, 256, device="cuda", requires_grad=True) for n in (50, 21))
    joint = torch.randn(512, 256, device="cuda", requires_grad=True)
    joint_frames = torch.randint(25, 51, (8,), device="cuda")
    joint_labels = torch.randint(10, 21, (8,), device="cuda")
    joint_args = (enc, pred, joint, None, targets[:8, :20], joint_frames, joint_labels)
    run(f"{tag}fused_joint_rnnt_loss (8, 50, 20, 256 -> 512, padded) fwd+bwd under sync debug mode 'error'",
        lambda: no_sync(lambda: ak.fused_joint_rnnt_loss(*joint_args, blank=0).backward()))
    ours = lambda: torch.autograd.grad(ak.rnnt_loss(logits, targets, frames, labels, blank=0), logits)  # noqa: E731

    def rnnt_speed():
        import torchaudio.functional as TAF

        theirs = lambda: torch.autograd.grad(TAF.rnnt_loss(logits, targets, frames, labels, blank=0), logits)  # noqa: E731
        eager, audio = eager_us(ours), eager_us(theirs)
        line = f"ours eager {eager:.0f} us, torchaudio eager {audio:.0f} us ({audio / eager:.2f}x its speed)"
        try:
            graphed = graph_us(ours, calls=5, replays=10)
            line += f"; ours in a CUDA graph {graphed:.0f} us ({audio / graphed:.2f}x)"
        except Exception as exc:  # noqa: BLE001 - the eager figures stand on their own
            line += f"; CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return line + " (target >= 2x)"

    run(f"{tag}rnnt_loss (16, 100, 30, 512) fp32 fwd+bwd", rnnt_speed)

    def rnnt_host():
        """The 2026-12-04 lease's Triton rnnt_loss: 1276 us eager, 373 us in a graph: where the host time goes."""
        from torch.profiler import ProfilerActivity, profile

        ours()
        torch.cuda.synchronize()
        calls = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                ours()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / calls
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
        top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]
        return (f"{kernels:.0f} kernels and {sum(e.count for e in ops) / calls:.0f} aten ops a call; most host time: "
                + ", ".join(f"{e.key} x{e.count / calls:.0f} {e.self_cpu_time_total / calls:.0f} us" for e in top))

    run(f"{tag}rnnt_loss (16, 100, 30, 512) fwd+bwd, where an eager call's host time goes", rnnt_host)


if __name__ == "__main__":
    main()
