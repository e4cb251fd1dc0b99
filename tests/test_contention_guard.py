"""The CPU loops' contention guard (csrc/cpu/parallel.h): while it runs everything on the caller alone, every
op gives what it gives on two threads, the thread settings it changes come back, it does see a thread
that the scheduler keeps off the CPU, and it tells waits among the process's own threads from a neighbour."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import amnets_kernels as ak
from amnets.encoder import AmNetsEncoder
from amnets_kernels import _C

pytestmark = pytest.mark.serial  # CPU pinning and busy processes: run alone (Makefile)


def _ops():
    """name -> callable returning the tensors to compare; our loops plus ATen's GEMMs and reductions."""
    torch.manual_seed(0)
    lstm = ak.nn.LowRankLSTM.from_lstm(torch.nn.LSTM(64, 64), rank=16)
    seq = torch.randn(7, 5, 64)
    w = ak.BlockSparseMatrix.from_dense(torch.randn(128, 96), block_size=32, sparsity=0.5)
    x = torch.randn(9, 96, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    logits = torch.randn(3, 6, 4, 11, requires_grad=True)
    targets = torch.randint(1, 11, (3, 3), dtype=torch.int32)
    frames, labels = torch.tensor([6, 5, 4], dtype=torch.int32), torch.tensor([3, 2, 3], dtype=torch.int32)
    enc, pred = torch.randn(3, 6, 16, requires_grad=True), torch.randn(3, 4, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    engine = AmNetsEncoder(24, 64, num_layers=2, cheap="sparse", sparsity=0.5, block_size=16).eval()
    chunk = torch.randn(3, 4, 24)

    def lstm_train():
        out, _ = lstm(seq)
        return [out, *torch.autograd.grad(out.square().sum(), [p for p in lstm.parameters()])]

    def bsr_train():
        y = torch.ops.amnets.bsr_linear(x, values, w.crow_indices, w.col_indices, 128, 96, None)
        return [y, *torch.autograd.grad(y.square().sum(), [x, values])]

    def rnnt():
        cost = ak.rnnt_loss(logits, targets, frames, labels, blank=0)
        return [cost, *torch.autograd.grad(cost, [logits])]

    def joint():
        cost = ak.fused_joint_rnnt_loss(enc, pred, weight, None, targets, frames, labels, blank=0)
        return [cost, *torch.autograd.grad(cost, [enc, pred, weight])]

    return {
        "LowRankLSTM fwd+bwd": lstm_train,
        "bsr_linear inference": lambda: [ak.bsr_linear(x.detach(), w)],
        "bsr_linear fwd+bwd": bsr_train,
        "rnnt_loss fwd+bwd": rnnt,
        "fused_joint_rnnt_loss fwd+bwd": joint,
        "AmNetsEncoder.stream": lambda: list(engine.stream(chunk)[:1]),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_a_serial_window_gives_the_same_results_and_restores_the_thread_count(name):
    fn = _ops()[name]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = fn()
        _C.cpu_window("serial", 60.0)
        assert _C.cpu_contention()["serial_for_ms"] > 0
        got = fn()
        assert torch.get_num_threads() == 2  # the scope's per-thread OpenMP setting was put back
        _C.cpu_window("serial", 0.0)
        again = fn()  # the window ended: threads again (what an op that outlives a window sees)
    finally:
        _C.cpu_window("serial", 0.0)
        torch.set_num_threads(threads)
    assert _C.cpu_contention()["serial_for_ms"] == 0
    for a, b, c in zip(want, got, again):
        # ATen's GEMMs may sum in another order on one thread; our loops' outputs do not depend on it
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)


_CHILD = textwrap.dedent("""
    import sys, time, torch, amnets_kernels as ak
    from amnets_kernels import _C
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lstm = ak.nn.LowRankLSTM.from_lstm(torch.nn.LSTM(512, 512), rank=128).eval()
    seq = torch.randn(50, 4, 512)
    with torch.no_grad():
        want = lstm(seq)[0]
        start, until = _C.cpu_contention()["stalls"], time.monotonic() + float(sys.argv[1])
        while _C.cpu_contention()["stalls"] == start and time.monotonic() < until:
            assert torch.equal(lstm(seq)[0], want)
    print(_C.cpu_contention()["enabled"], _C.cpu_contention()["stalls"] - start)
""")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to pin to")
@pytest.mark.parametrize("guard", ["1", "0"])
def test_the_guard_sees_threads_kept_off_the_cpu(guard):
    """Two CPUs, two busy processes pinned to them and a 2-thread op pinned there too: its threads wait for
    a CPU, and the guard notes it (or, turned off, notes nothing), while the results stay the same."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731  (inherited by the child's threads)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin) for _ in cpus]
    try:
        env = dict(os.environ, AMNETS_CONTENTION_GUARD=guard)
        seconds = "30" if guard == "1" else "3"  # on: it stops at the first stall, in well under a second
        done = subprocess.run([sys.executable, "-c", _CHILD, seconds], preexec_fn=pin, env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        done = None
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if guard == "0":
        # off: it never notes a stall (the child runs until its deadline)
        assert done is not None and done.returncode == 0, done and done.stderr
        assert done.stdout.split() == ["False", "0"]
    else:
        assert done is not None and done.returncode == 0, done and done.stderr
        enabled, stalls = done.stdout.split()
        assert enabled == "True" and int(stalls) >= 1


_OWN_CHILD = textwrap.dedent("""
    import sys, time, torch, torch.nn.functional as F, amnets_kernels as ak
    from amnets_kernels import _C
    torch.set_num_threads(2)
    torch.manual_seed(0)
    w = ak.BlockSparseMatrix.from_dense(torch.randn(2048, 1024), block_size=32, sparsity=0.5)
    x, dense = torch.randn(64, 1024), torch.randn(1024, 1024)
    want = ak.bsr_linear(x, w)
    before, until = _C.cpu_contention(), time.monotonic() + float(sys.argv[1])
    while _C.cpu_contention()["own_waits"] == before["own_waits"] and time.monotonic() < until:
        F.linear(x, dense)  # ATen's OpenMP team, which then spins beside our pool's worker
        assert torch.equal(ak.bsr_linear(x, w), want)
    after = _C.cpu_contention()
    print(after["own_waits"] - before["own_waits"], after["openmp_for_ms"] > 0)
""")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to pin to")
@pytest.mark.parametrize("guard", ["1", "0"])
def test_waits_among_our_own_threads_move_the_loops_onto_openmp(guard):
    """Our op called right after ATen ops, on two CPUs with nothing else pinned there: the pool's worker waits
    behind OpenMP's spinning team. The guard sees that the process itself held the CPUs, and runs our loops on
    OpenMP's threads for a while (an own wait, not a stall that would make them serial)."""
    pin = lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # noqa: E731
    env = dict(os.environ, AMNETS_CONTENTION_GUARD=guard)
    done = subprocess.run([sys.executable, "-c", _OWN_CHILD, "30" if guard == "1" else "3"], preexec_fn=pin, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    own, window = done.stdout.split()
    assert (int(own) >= 1 and window == "True") if guard == "1" else (own, window) == ("0", "False")


def test_the_window_hook_refuses_what_int64_nanoseconds_cannot_hold_and_unknown_kinds():
    for bad in (float("inf"), float("nan"), 1e10, -1.0):  # a cast of these to int64 ns was undefined
        with pytest.raises(ValueError, match=r"seconds must be in \[0, 1e6\]"):
            _C.cpu_window("serial", bad)
    with pytest.raises(ValueError, match="kind must be 'serial' or 'openmp'; got 'pool'"):
        _C.cpu_window("pool", 1.0)
    assert _C.cpu_contention()["serial_for_ms"] == 0 and _C.cpu_contention()["openmp_for_ms"] == 0

