"""The public ops and swapped modules called from many Python threads at once (a server's worker threads):
torch.ops release the GIL, so our kernels, the CPU thread pool (one caller at a time, the others run inline),
the per-pattern index cache and the backend state really run concurrently. Every call must equal the same call
made alone, bit for bit, and a use_backend scope must stay on its own thread. (The streams' own thread rules:
tests/test_frame_engine.py.)"""

import os
import random
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import amnets_kernels as ak


def _bsr_fwd_bwd(weight, x):
    values = weight.values.detach().requires_grad_()
    matrix = ak.BlockSparseMatrix(values, weight.crow_indices, weight.col_indices, weight.shape)
    x = x.clone().requires_grad_()
    y = ak.bsr_linear(x, matrix)
    y.square().sum().backward()
    return [y.detach(), x.grad, values.grad]


def _fresh_pattern(seed):
    """A new sparsity pattern per call: its backward's index structures are built while other threads use theirs."""
    gen = torch.Generator().manual_seed(seed)
    weight = ak.BlockSparseMatrix.from_dense(torch.randn(256, 128, generator=gen), block_size=16, sparsity=0.5)
    return _bsr_fwd_bwd(weight, torch.randn(5, 128, generator=gen))


def _with_grads(fn, *inputs):
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    loss = out if out.dim() == 0 else out.square().sum()
    loss.backward()
    return [out.detach()] + [t.grad for t in inputs]


class _Acoustic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.out = nn.LSTM(40, 128, num_layers=2), nn.Linear(128, 256)

    def forward(self, x):
        return self.out(self.lstm(x)[0])


def _calls():
    """name -> a call with fixed inputs. The kernels use the CPU thread pool; the large bsr_linear (~1 ms) makes
    sure calls on different threads overlap in it."""
    torch.manual_seed(0)
    large = ak.BlockSparseMatrix.from_dense(torch.randn(2048, 1024), block_size=32, sparsity=0.5)
    x_large = torch.randn(16, 1024)
    d, h, r = 256, 192, 48
    dense = torch.randn(4 * h, d + h)
    sparse = {b: ak.BlockSparseMatrix.from_dense(dense, block_size=b, sparsity=0.7) for b in (16, 32)}
    sparse_bf16 = ak.BlockSparseMatrix.from_dense(dense.bfloat16(), block_size=32, sparsity=0.7)
    x1, x16 = torch.randn(1, d + h), torch.randn(16, d + h)
    bsr_cell = ak.PreparedBsrLstmCell(sparse[32], torch.randn(4 * h))
    factors = [torch.randn(4 * h, r) * 0.1, torch.randn(r, d) * 0.1, torch.randn(4 * h, r) * 0.1,
               torch.randn(r, h) * 0.1, torch.randn(4 * h)]
    lowrank_cell = ak.PreparedLowrankLstmCell(*factors)
    xs, hs, cs, seq = torch.randn(4, d), torch.randn(4, h), torch.randn(4, h), torch.randn(12, 3, d)
    b, t, u, v = 3, 24, 6, 40
    logits, enc, pred, joint_w = (torch.randn(b, t, u + 1, v), torch.randn(b, t, 64), torch.randn(b, u + 1, 64),
                                  torch.randn(v, 64) * 0.2)
    labels = torch.randint(1, v, (b, u), dtype=torch.int32)
    frames, label_lengths = torch.tensor([24, 19, 11], dtype=torch.int32), torch.tensor([6, 4, 2], dtype=torch.int32)
    lowrank_model = ak.swap_in(_Acoustic(), lstm_rank=32, linear_sparsity=0.75, only_if_cheaper=False).eval()
    sparse_model = ak.swap_in(_Acoustic(), lstm_sparsity=0.7, linear_sparsity=0.75, block_size=16,
                              only_if_cheaper=False).eval()
    feats = torch.randn(20, 2, 40)

    def inference(model):
        with torch.inference_mode():
            return [model(feats)]

    return {
        "bsr_linear 2048x1024 M=16": lambda: [ak.bsr_linear(x_large, large)],
        "bsr_linear M=1": lambda: [ak.bsr_linear(x1, sparse[32])],
        "bsr_linear M=16 b=16": lambda: [ak.bsr_linear(x16, sparse[16])],
        "bsr_linear bf16": lambda: [ak.bsr_linear(x16.bfloat16(), sparse_bf16)],
        "bsr_linear fwd+bwd": lambda: _bsr_fwd_bwd(sparse[32], x16),
        "bsr_linear new pattern a": lambda: _fresh_pattern(1),
        "bsr_linear new pattern b": lambda: _fresh_pattern(2),
        "PreparedBsrLstmCell": lambda: list(bsr_cell(xs, hs, cs)),
        "PreparedLowrankLstmCell": lambda: list(lowrank_cell(xs, hs, cs)),
        "lowrank_lstm_sequence fwd+bwd": lambda: _with_grads(
            lambda x, *w: ak.lowrank_lstm_sequence(x, None, None, *w)[0], seq, *factors),
        "rnnt_loss fwd+bwd": lambda: _with_grads(
            lambda lg: ak.rnnt_loss(lg, labels, frames, label_lengths, blank=0), logits),
        "fused_joint_rnnt_loss fwd+bwd": lambda: _with_grads(
            lambda e, p, w: ak.fused_joint_rnnt_loss(e, p, w, None, labels, frames, label_lengths, blank=0),
            enc, pred, joint_w),
        "swapped low-rank model": lambda: inference(lowrank_model),
        "swapped block-sparse model": lambda: inference(sparse_model),
    }


def test_ops_on_many_threads_equal_each_call_made_alone():
    calls = _calls()
    alone = {name: call() for name, call in calls.items()}
    names, failures, start = sorted(calls), [], threading.Barrier(4)

    def worker(seed):
        order = [n for n in names for _ in range(24 if n.startswith("bsr_linear 2048") else 6)]
        random.Random(seed).shuffle(order)
        start.wait()
        for name in order:
            try:
                got = calls[name]()
            except Exception as exc:  # noqa: BLE001 - reported below with the call's name
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            for i, (a, b) in enumerate(zip(got, alone[name])):
                if not torch.equal(a, b):
                    failures.append(f"{name} output {i}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:10]


@pytest.mark.parametrize("scoped", ["reference", "cpu"])
def test_a_use_backend_scope_stays_on_its_thread(scoped):
    """Thread A holds `use_backend(scoped)` open while thread B, outside any scope, calls the op: B runs the
    default face (cpu), A the scoped one; each equals the dense math."""
    weight = ak.BlockSparseMatrix.from_dense(torch.randn(64, 64), block_size=16, sparsity=0.5)
    x = torch.randn(3, 64)
    expected = x @ weight.to_dense().T
    entered, done, seen = threading.Event(), threading.Event(), {}

    def scoped_thread():
        with ak.use_backend(scoped):
            entered.set()
            done.wait(10)
            seen["A"] = (ak.get_backend(), ak.which_face("bsr_linear"), ak.bsr_linear(x, weight))

    a = threading.Thread(target=scoped_thread)
    a.start()
    assert entered.wait(10)
    try:
        seen["B"] = (ak.get_backend(), ak.which_face("bsr_linear"), ak.bsr_linear(x, weight))
    finally:
        done.set()
        a.join()
    assert seen["A"][:2] == (scoped, scoped)
    assert seen["B"][:2] == ("auto", "cpu")
    for _, _, y in seen.values():
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_tsan_reports_judges_only_races_it_can_see(tmp_path, capsys):
    """tests/tsan_reports.py (make tsan) sets aside reports with an OpenMP team thread or a thread's TLS teardown
    in them, and fails on any other."""
    import tsan_reports

    def report(*frames):
        lines = "\n".join(f"    #{i} {f} (lib.so+0x{i})" for i, f in enumerate(frames))
        return f"==================\nWARNING: ThreadSanitizer: data race (pid=1)\n  Write of size 8 by thread T1:\n{lines}\n"

    openmp = report("amnets::cpu::recur", "at::internal::invoke_parallel", "gomp_thread_start")
    teardown = report("free", "__GI__dl_deallocate_tls")
    ours = report("amnets::cpu::Pool::claim", "amnets::cpu::parallel_run")
    quiet, racy = tmp_path / "tsan.1", tmp_path / "tsan.2"
    quiet.write_text(openmp + teardown + openmp)
    racy.write_text(openmp + ours + ours)
    assert tsan_reports.main([str(quiet), str(tmp_path / "tsan.absent")]) == 0
    assert "2  with an OpenMP team thread" in capsys.readouterr().out
    assert tsan_reports.main([str(quiet), str(racy)]) == 1
    out = capsys.readouterr().out
    assert "2  judged" in out and out.count("amnets::cpu::Pool::claim") == 1  # each distinct race printed once


RESIZE_SCRIPT = """
import threading, torch, amnets_kernels as ak
torch.manual_seed(0)
w = ak.BlockSparseMatrix.from_dense(torch.randn(512, 512), block_size=32, sparsity=0.5)
x = torch.randn(16, 512)
ref = ak.bsr_linear(x, w)
for i in range(400):  # every call after a change resizes the pool (2 <-> 3 threads)
    torch.set_num_threads(2 + (i & 1))
    assert torch.equal(ak.bsr_linear(x, w), ref)
other = threading.Thread(target=lambda: [ak.bsr_linear(x, w) for _ in range(300)])
torch.set_num_threads(2)
other.start()  # its thread count stays what it first saw; calls alternating between the two threads resize
torch.set_num_threads(3)
for _ in range(300):
    assert torch.equal(ak.bsr_linear(x, w), ref)
other.join()
print("done")
"""


def test_the_pool_resizes_between_calls_without_a_hang():
    """A thread-count change resizes our pool on the next call (its workers stopped and joined, new ones
    started). A new worker that first ran after the next resize had begun waited for a wake-up that had
    already passed, and join() waited for it: the process hung on the first or second change (every run),
    and so did two threads with different torch thread counts calling in turn."""
    run = subprocess.run([sys.executable, "-c", RESIZE_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, AMNETS_CONTENTION_GUARD="1"))
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]
