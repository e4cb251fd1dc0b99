"""python -m benchmarks.contention [--threads N] [--hogs K] [--quick]: how much each op slows down when one
other single-threaded process competes for the CPU (issue 17: no op may grow by more than 2.5x), or K of them
(--hogs K > 1: heavier load, growth reported with no goal; issue 17 saw growths of 7-25x at a load average of
6-9 before the contention guard).

The busy-loop processes are started once and paused (SIGSTOP) or let run (SIGCONT) between rounds, so that the
quiet and the contended timings of every row alternate (ROUNDS each) under the same machine state. A row's
growth is median(contended) / median(quiet). With N op threads sharing the machine's cores with the hog,
the fair slowdown is (N + 1) / cores when N >= cores (1.5x for 2 threads on 2 cores); much more means that
the op's threads wait on a descheduled peer (a barrier per parallel region) or spin against the hog.
Rows: each op's headline shape on the path users run, and the stock PyTorch op it replaces, for scale.
The guard column counts the stalls our contention guard (csrc/cpu/parallel.h) saw in the row's quiet and
contended rounds: each one ran the CPU loops serially for a window of up to 256 ms, so a quiet round starts
only after that long (the hog paused), and a stall in a quiet round would show here. The last column times
the op quiet on one thread (torch.set_num_threads(1), in the quiet rounds): what the guard falls back to
beside the hog, so its ratio to the quiet time is about the growth a contended run cannot go below. Where the
op's weights fit the two cores' L2 caches together but not one, that floor is above the 2 threads' 2x.

A second table (no hog; reported, no goal): each op inside a model, that is right after a stock ATen op (an
F.linear on OpenMP's threads, whose team spins for milliseconds after it), its calls alone timed, on --threads
threads and on one; a ratio near 1 says the op ran on one thread there. The guard columns count the stalls it
saw and the OpenMP windows it began for waits among the process's own threads (csrc/cpu/parallel.h: those move
our loops onto OpenMP's threads for a while instead of serialising them).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .__main__ import cpu_model
from .harness import at_least, command_line, loop_mean

GOAL = 2.5


def mean_ms(fn, seconds: float) -> float:
    return loop_mean(fn, seconds, min_calls=2) * 1e3


def rows(quick: bool):
    """(label, callable) pairs; every callable runs one call of the op as users make it."""
    import torchaudio.functional as TAF

    import amnets_kernels as ak

    torch.manual_seed(0)
    out, k = [], (512 if quick else 2048)
    dense = torch.randn(2 * k, k)
    w = ak.BlockSparseMatrix.from_dense(dense, block_size=32, sparsity=0.75)
    for m in (1, 16):
        x = torch.randn(m, k)
        out.append((f"bsr_linear {2 * k}x{k} d=0.25 M={m} fwd", lambda x=x: ak.bsr_linear(x, w)))
        out.append((f"  F.linear {2 * k}x{k} M={m} fwd (stock)", lambda x=x: F.linear(x, dense)))
    xg, vg = torch.randn(16, k, requires_grad=True), w.values.clone().requires_grad_(True)
    gy = torch.randn(16, 2 * k)

    def bsr_train():  # the op's forward and backward: gradients returned, not accumulated
        y = torch.ops.amnets.bsr_linear(xg, vg, w.crow_indices, w.col_indices, 2 * k, k, None)
        torch.autograd.grad(y, [xg, vg], gy)

    def bsr_train_into_grad():  # what a training step adds: ATen's sum, and += into the 8 MB .grad
        y = torch.ops.amnets.bsr_linear(xg, vg, w.crow_indices, w.col_indices, 2 * k, k, None)
        y.sum().backward()

    out.append((f"bsr_linear {2 * k}x{k} d=0.25 M=16 fwd+bwd", bsr_train))
    out.append((f"  same, y.sum().backward() into .grad (ATen's sum and accumulation)", bsr_train_into_grad))

    hidden, frames = (256, 20) if quick else (1024, 100)
    lstm = torch.nn.LSTM(hidden, hidden).eval()
    low = ak.nn.LowRankLSTM.from_lstm(lstm, rank=hidden // 4).eval()
    for batch in (1, 16):
        seq = torch.randn(frames, batch, hidden)
        out.append((f"LowRankLSTM H={hidden} r={hidden // 4} T={frames} B={batch} fwd",
                    lambda seq=seq: torch.no_grad()(low)(seq)))
        out.append((f"  nn.LSTM H={hidden} T={frames} B={batch} fwd (stock)", lambda seq=seq: torch.no_grad()(lstm)(seq)))

    batch, t, u, v = (4, 30, 10, 64) if quick else (16, 100, 30, 512)
    logits = torch.randn(batch, t, u + 1, v, requires_grad=True)
    targets = torch.randint(1, v, (batch, u), dtype=torch.int32)
    lengths = torch.full((batch,), t, dtype=torch.int32), torch.full((batch,), u, dtype=torch.int32)
    labels = (targets, *lengths)
    out.append((f"rnnt_loss ({batch}, {t}, {u + 1}, {v}) fwd+bwd",
                lambda: ak.rnnt_loss(logits, *labels, blank=0).backward()))
    out.append((f"  torchaudio rnnt_loss ({batch}, {t}, {u + 1}, {v}) fwd+bwd (stock)",
                lambda: TAF.rnnt_loss(logits, *labels, blank=0).backward()))

    batch, t, u, d, v = (2, 20, 8, 32, 64) if quick else (8, 200, 50, 320, 1024)
    enc, pred = torch.randn(batch, t, d, requires_grad=True), torch.randn(batch, u + 1, d, requires_grad=True)
    weight, bias = torch.randn(v, d, requires_grad=True), torch.zeros(v, requires_grad=True)
    targets = torch.randint(1, v, (batch, u), dtype=torch.int32)
    lengths = torch.full((batch,), t, dtype=torch.int32), torch.full((batch,), u, dtype=torch.int32)
    out.append((f"fused_joint_rnnt_loss ({batch}, {t}, {u + 1}, {d}, {v}) fwd+bwd",
                lambda: ak.fused_joint_rnnt_loss(enc, pred, weight * 0.05, bias, targets, *lengths, blank=0).backward()))

    from amnets.encoder import AmNetsEncoder

    hidden = 128 if quick else 1024
    model = AmNetsEncoder(240, hidden, num_layers=3, cheap="sparse", sparsity=0.8, block_size=32).eval()
    x = torch.randn(1, 1, 240)
    for force in ("full", "cheap"):
        streamer = model.streamer(force=force)
        out.append((f"AmNetsEncoder H={hidden} x3 stream, one frame, all-{force}", lambda s=streamer: s(x)))
    return out


def mixed_rows(quick: bool):
    """(label, op, stock op before it) for the table of ops inside a model."""
    import amnets_kernels as ak

    torch.manual_seed(0)
    k, m = (512, 16) if quick else (2048, 64)
    x, w = torch.randn(m, k), torch.randn(k, k)
    aten = lambda: F.linear(x, w)  # noqa: E731
    out = []
    for dtype, density in ((torch.bfloat16, 0.5), (torch.float32, 0.25)):
        sparse = ak.BlockSparseMatrix.from_dense(torch.randn(2 * k, k).to(dtype), block_size=32, sparsity=1 - density)
        xs = torch.randn(m, k).to(dtype)
        out.append((f"bsr_linear {2 * k}x{k} d={density} M={m} {str(dtype).split('.')[-1]} fwd",
                    lambda xs=xs, sparse=sparse: ak.bsr_linear(xs, sparse), aten))
    hidden = 256 if quick else 1024
    low = ak.nn.LowRankLSTM.from_lstm(torch.nn.LSTM(hidden, hidden), rank=hidden // 4).eval()
    seq = torch.randn(20 if quick else 100, 16, hidden)
    out.append((f"LowRankLSTM H={hidden} r={hidden // 4} T={seq.size(0)} B=16 fwd",
                lambda: torch.no_grad()(low)(seq), aten))
    return out


def mixed(wanted: list, rounds: int, seconds: float, threads: int) -> None:
    """The second table (module docstring): each op timed alone in a loop of (stock op, op) pairs."""
    from amnets_kernels import _C

    print(f"\nInside a model (no hog; reported, no goal): each call right after a stock F.linear on OpenMP's threads; "
          f"mean of the op's calls alone, median of {rounds} rounds, {threads} threads and 1 alternating.\n")
    print(f"| row | {threads} threads ms | 1 thread ms | ratio | guard stalls / own waits |\n|---|---|---|---|---|")
    for label, op, before in wanted:
        times = {threads: [], 1: []}
        stats = _C.cpu_contention()
        for _ in range(rounds):
            for n in (threads, 1):
                torch.set_num_threads(n)
                spent, calls, start = 0.0, 0, time.perf_counter()
                while calls < 3 or time.perf_counter() - start < seconds:
                    before()
                    t0 = time.perf_counter()
                    op()
                    spent += time.perf_counter() - t0
                    calls += 1
                times[n].append(spent / calls * 1e3)
        torch.set_num_threads(threads)
        now = _C.cpu_contention()
        many, one = statistics.median(times[threads]), statistics.median(times[1])
        print(f"| {label} | {many:.3f} | {one:.3f} | {many / one:.2f} | {now['stalls'] - stats['stalls']} / "
              f"{now['own_waits'] - stats['own_waits']} |", flush=True)


def main() -> None:
    parser = command_line(__doc__, "benchmarks.contention")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round: a smoke run")
    parser.add_argument("--rounds", type=at_least(1), default=None,
                        help="rounds of each row, quiet and with the hog (default 5; --quick times 1 and takes none)")
    parser.add_argument("--filter", default="", help="only rows whose label contains this text")
    parser.add_argument("--hogs", type=at_least(1), default=1,
                        help="busy-loop processes beside the op (default 1, issue 17's goal; more: reported, no goal)")
    args = parser.parse_args()
    if args.quick and args.rounds is not None:
        parser.error("argument --rounds: --quick times 1 round; give one or the other")
    torch.set_num_threads(args.threads)
    rounds, seconds = (1, 0.05) if args.quick else (args.rounds or 5, 0.3)
    wanted = [(label, fn) for label, fn in rows(args.quick) if args.filter in label]
    inside = [row for row in mixed_rows(args.quick) if args.filter in row[0]] if args.hogs == 1 and args.threads > 1 else []
    if not wanted and not inside:
        parser.error(f"argument --filter: {args.filter!r} matches no row")
    cores = len(os.sched_getaffinity(0))
    beside = "one busy-loop process" if args.hogs == 1 else f"{args.hogs} busy-loop processes"
    print(f"# contention: {cpu_model()}, {cores} cores, {args.threads} op thread(s) + {beside}, "
          f"torch {torch.__version__}, {rounds} rounds of each, alternating\n")
    goal = f"goal <= {GOAL}" if args.hogs == 1 else f"goal (for 1 hog; {args.hogs} here)"
    print(f"| row | quiet ms | with the hog{'s' * (args.hogs > 1)} ms | growth | {goal} | guard stalls quiet / hog "
          f"| 1 thread, quiet: ms (/ quiet) |\n"
          "|---|---|---|---|---|---|---|")
    from amnets_kernels import _C

    def stalls() -> int:
        return _C.cpu_contention()["stalls"]

    hogs: list[subprocess.Popen] = []

    def signal_hogs(sig) -> None:
        for hog in hogs:
            hog.send_signal(sig)

    try:
        hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs))
        for label, fn in wanted:
            quiet, loaded, alone, seen = [], [], [], [0, 0]
            for _ in range(rounds):
                signal_hogs(signal.SIGSTOP)
                time.sleep(0.3)  # past the guard's longest serial window
                before = stalls()
                quiet.append(mean_ms(fn, seconds))
                seen[0] += stalls() - before
                torch.set_num_threads(1)  # what the guard falls back to: the op on its caller's thread alone
                alone.append(mean_ms(fn, seconds))
                torch.set_num_threads(args.threads)
                signal_hogs(signal.SIGCONT)
                time.sleep(0.05)
                before = stalls()
                loaded.append(mean_ms(fn, seconds))
                seen[1] += stalls() - before
            q, h, one = statistics.median(quiet), statistics.median(loaded), statistics.median(alone)
            stock = label.startswith("  ")
            if stock:
                verdict = "(for scale)"
            elif args.hogs > 1:
                verdict = "(reported)"
            else:
                verdict = "met" if h / q <= GOAL else "**missed**"
            print(f"| {label.strip()} | {q:.3f} | {h:.3f} | {h / q:.2f} | {verdict} | {seen[0]} / {seen[1]} "
                  f"| {one:.3f} ({one / q:.2f}) |", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if inside:
        mixed(inside, rounds, seconds, args.threads)


if __name__ == "__main__":
    main()
