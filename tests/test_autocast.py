"""torch.autocast and the public ops (csrc/autocast.cpp): bsr_linear and the lowrank LSTM ops run in the
autocast dtype, the RNN-T losses in float32; the casts are autograd's, so fp32 parameters get fp32
gradients. The expected answers are the same ops outside autocast on inputs cast by hand."""

import copy

import pytest
import torch

import amnets_kernels as ak
from amnets_kernels.nn import BlockSparseLinear, LowRankLSTM

from conftest import DEVICE, FACES, use_face
from helpers import close, grads, rand
from test_bsr import make
from test_fused_joint import joint_inputs
from test_lowrank_lstm import factors
from test_rnnt import batch_of

LOW = [torch.bfloat16, torch.float16]


def autocast(dtype):
    return torch.autocast(DEVICE, dtype=dtype)


def cast(args, dtype):
    """What autocast does to the arguments: floating tensors (not float64) to `dtype`, differentiably."""
    def one(a):
        eligible = torch.is_tensor(a) and a.is_floating_point() and a.dtype != torch.float64
        return a.to(dtype) if eligible else a
    return [one(a) for a in args]


def bsr_args():
    _, sparse = make(8, 16, 4, 0.5)
    values = sparse.values.requires_grad_(True)
    x = rand(2, 3, 16, device=DEVICE, requires_grad=True)  # leading dims: bsr_linear reshapes inside
    bias = rand(8, device=DEVICE, requires_grad=True)
    return [x, values, sparse.crow_indices, sparse.col_indices, 8, 16, bias]


def cell_args():
    return [rand(2, 8, device=DEVICE, requires_grad=True), rand(2, 6, device=DEVICE, requires_grad=True),
            rand(2, 6, device=DEVICE), *factors(8, 6, 3, 3, requires_grad=True)]


def sequence_args(state):
    h0, c0 = None, None
    if state:
        h0, c0 = rand(2, 6, device=DEVICE, requires_grad=True), rand(2, 6, device=DEVICE)
    x = rand(4, 2, 8, device=DEVICE, requires_grad=True)
    return [x, h0, c0, *factors(8, 6, 3, 3, requires_grad=True)]


def rnnt_args():
    return list(batch_of(2, 4, 3, 5, 0)) + [0]


def joint_args():
    return list(joint_inputs(2, 4, 3, 8, 6)) + [0]


# (op, argument builder, whether it runs in the autocast dtype (else float32))
CASES = {
    "bsr_linear": (torch.ops.amnets.bsr_linear, bsr_args, True),
    "lowrank_lstm_cell": (torch.ops.amnets.lowrank_lstm_cell, cell_args, True),
    "lowrank_lstm_sequence": (torch.ops.amnets.lowrank_lstm_sequence, lambda: sequence_args(True), True),
    "lowrank_lstm_sequence_zero_state":
        (torch.ops.amnets.lowrank_lstm_sequence, lambda: sequence_args(False), True),
    "rnnt_loss": (torch.ops.amnets.rnnt_loss, rnnt_args, False),
    "fused_joint_rnnt_loss": (torch.ops.amnets.fused_joint_rnnt_loss, joint_args, False),
}


def face_op(case):
    return case.removesuffix("_zero_state")


def outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES)
def test_op_under_autocast_matches_hand_cast_inputs(face, dtype, case):
    op, build, lower = CASES[case]
    want_dtype = dtype if lower else torch.float32
    with use_face(face_op(case), face):
        args = build()
        with autocast(dtype):
            got = outputs(op(*args))
        assert all(o.dtype == want_dtype for o in got), [o.dtype for o in got]
        want = outputs(op(*cast(args, want_dtype)))  # outside autocast
        for g, w in zip(got, want):
            close(g, w, dtype, scale=4)
        # Gradients reach the fp32 leaves in fp32, through autocast's casts as through the hand-made ones.
        leaves = [a if torch.is_tensor(a) and a.requires_grad else None for a in args]
        got_grads, want_grads = grads(got, leaves), grads(want, leaves)
        for leaf, g, w in zip(leaves, got_grads, want_grads):
            if leaf is not None:
                assert g is not None and g.dtype == leaf.dtype == torch.float32
                close(g, w, dtype, scale=4)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("case", CASES)
def test_backward_inside_the_autocast_region(face, case):
    """loss.backward() under autocast: the backward ops' kernels must not be cast behind their backs."""
    op, build, _ = CASES[case]
    with use_face(face_op(case), face):
        args = build()
        want = outputs(op(*cast(args, torch.bfloat16)))
        leaves = [a if torch.is_tensor(a) and a.requires_grad else None for a in args]
        want_grads = grads(want, leaves)
        with autocast(torch.bfloat16):
            got_grads = grads(outputs(op(*args)), leaves)
        for g, w, leaf in zip(got_grads, want_grads, leaves):
            if w is not None:
                assert g.dtype == leaf.dtype  # the casts are autograd's: an fp32 leaf gets an fp32 gradient
                close(g, w, torch.bfloat16, scale=4)


@pytest.mark.parametrize("face", FACES)
def test_losses_take_low_precision_inputs_up_to_float32(face):
    with use_face("rnnt_loss", face):
        logits, *labels = batch_of(2, 4, 3, 5, 0, dtype=torch.bfloat16)
        with autocast(torch.bfloat16):
            loss = ak.rnnt_loss(logits, *labels, blank=0, reduction="none")
        assert loss.dtype == torch.float32
        close(loss, ak.rnnt_loss(logits.detach().float(), *labels, blank=0, reduction="none"))
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert grad.dtype == torch.bfloat16
    with use_face("fused_joint_rnnt_loss", face):
        args = joint_inputs(2, 4, 3, 8, 6, dtype=torch.float16)
        with autocast(torch.bfloat16):
            loss = ak.fused_joint_rnnt_loss(*args, blank=0, reduction="none")
        assert loss.dtype == torch.float32
        exact = ak.fused_joint_rnnt_loss(*(a.detach().float() for a in args[:4]), *args[4:], blank=0,
                                         reduction="none")
        close(loss, exact)


@pytest.mark.parametrize("face", FACES)
def test_mixed_dtypes_meet_in_the_autocast_dtype(face):
    """fp32 input, bf16 weights: an error outside autocast (the ops want one dtype), fine inside."""
    with use_face("bsr_linear", face):
        x, values, crow, col, out_f, in_f, bias = bsr_args()
        values16 = values.detach().bfloat16()
        with pytest.raises(TypeError, match="dtype"):
            torch.ops.amnets.bsr_linear(x, values16, crow, col, out_f, in_f, bias)
        with autocast(torch.bfloat16):
            y = torch.ops.amnets.bsr_linear(x, values16, crow, col, out_f, in_f, bias)
        assert y.dtype == torch.bfloat16
        close(y, torch.ops.amnets.bsr_linear(x.bfloat16(), values16, crow, col, out_f, in_f, bias.bfloat16()))


@pytest.mark.parametrize("case", CASES)
def test_float64_is_left_alone_and_autocast_off_changes_nothing(case):
    op, build, _ = CASES[case]
    args = build()
    want = outputs(op(*args))
    assert all(o.dtype == torch.float32 for o in want)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=False):
        for g, w in zip(outputs(op(*args)), want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    args64 = [a.detach().double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with autocast(torch.bfloat16):  # autocast casts no float64 (as torch's own ops)
        got = outputs(op(*args64))
    want = outputs(op(*args64))
    assert all(g.dtype == torch.float64 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", LOW)
def test_modules_under_autocast(face, dtype):
    with use_face("lowrank_lstm_sequence", face):
        lstm = LowRankLSTM(8, 6, rank=3).to(DEVICE)
        x = rand(5, 2, 8, device=DEVICE)
        with autocast(dtype):
            out, (h, c) = lstm(x)
        assert out.dtype == h.dtype == c.dtype == dtype
        want, (want_h, want_c) = copy.deepcopy(lstm).to(dtype)(x.to(dtype))  # outside autocast
        for g, w in ((out, want), (h, want_h), (c, want_c)):
            close(g, w, dtype, scale=4)
        (out.float().sum() + h.float().sum()).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lstm.parameters())
    with use_face("bsr_linear", face):
        linear = BlockSparseLinear(16, 8, block_size=4, sparsity=0.5).to(DEVICE)
        x = rand(3, 16, device=DEVICE)
        with autocast(dtype):
            y = linear(x)
        assert y.dtype == dtype
        close(y, copy.deepcopy(linear).to(dtype)(x.to(dtype)), dtype)
        y.float().sum().backward()
        assert linear.values.grad.dtype == linear.bias.grad.dtype == torch.float32
        with torch.no_grad():
            assert linear(x).dtype == torch.float32  # outside autocast: as before


def test_reference_face_under_autocast():
    """The reference face (Python, reached from C++ with autocast off) sees the cast tensors."""
    lstm, x = LowRankLSTM(8, 6, rank=3).to(DEVICE), rand(5, 2, 8, device=DEVICE)
    with ak.use_backend("reference"):
        with autocast(torch.bfloat16):
            out, _ = lstm(x)
        assert out.dtype == torch.bfloat16 and ak.last_face("lowrank_lstm_sequence") == "reference"
        close(out, copy.deepcopy(lstm).bfloat16()(x.bfloat16())[0])
        with autocast(torch.bfloat16):
            loss = ak.rnnt_loss(*batch_of(2, 4, 3, 5, 0), blank=0)
        assert loss.dtype == torch.float32 and ak.last_face("rnnt_loss") == "reference"


def test_lstm_modules_real_models_use_under_autocast():
    """The module forms swap_in puts in (bidirectional / projected LowRankLSTM, BlockSparseLSTM, the cell) run
    under autocast and stay close to their fp32 answers; prepared fused steps leave autocast to the ops."""
    import warnings

    from amnets_kernels.nn import BlockSparseLSTM, LowRankLSTMCell

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = [LowRankLSTM(8, 16, rank=4, num_layers=2, bidirectional=True, proj_size=6),
                   BlockSparseLSTM(16, 16, sparsity=0.5, block_size=16), LowRankLSTMCell(8, 16, rank=4)]
    inputs = [rand(5, 2, 8), rand(5, 2, 16), rand(2, 8)]
    for module, x in zip(modules, inputs):
        module = module.to(DEVICE).eval()
        x = x.to(DEVICE)
        with torch.no_grad():
            want = module(x)[0]
            with autocast(torch.bfloat16):
                got = module(x)[0]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


MIXES = [(x, h, c) for x in (torch.float32, torch.bfloat16) for h in (torch.float32, torch.bfloat16)
         for c in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_the_cell_returns_what_nn_lstmcell_returns_under_cpu_autocast(mix):
    """nn.LSTMCell's op is on no CPU autocast list: its products run in the autocast dtype and its update in
    c_0's, so (h_1, c_1) come in c_0's dtype whatever the input's and h_0's are (a fresh state: the input's).
    LowRankLSTMCell takes every fp32/bf16 mix nn.LSTMCell takes and returns the same dtypes, so its state can
    go back in outside autocast."""
    from amnets_kernels.nn import LowRankLSTMCell

    torch.manual_seed(0)
    dense = torch.nn.LSTMCell(8, 16)
    cell = LowRankLSTMCell.from_lstm_cell(dense, rank=8, rank_hh=16)  # full rank: the same cell
    x_dtype, h_dtype, c_dtype = mix
    x = rand(2, 8).to(x_dtype)
    for hx in (None, (rand(2, 16).to(h_dtype), rand(2, 16).to(c_dtype))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = dense(x, hx), cell(x, hx)
        assert [t.dtype for t in got] == [t.dtype for t in want] == [(x_dtype if hx is None else c_dtype)] * 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0.05)
        if hx is None and x_dtype == torch.float32:
            cell(x, got)  # the state goes back in outside autocast


@pytest.mark.parametrize("proj", [0, 8], ids=["plain", "proj"])
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_lstms_take_nn_lstms_dtypes_under_cpu_autocast(mix, proj):
    """nn.LSTM under CPU autocast (torch 2.14) takes input and state in any mix of fp32 and the autocast dtype
    and returns the autocast dtype — except where it runs step by step: a PackedSequence of unequal lengths
    returns all in c_0's dtype (fp32 without a state: the input's), and with a projection (proj_size) out and
    h_n come in the autocast dtype and c_n in c_0's (the input's). The swapped modules take the same mixes and
    return the same dtypes, a frame at a time (the native stack step's path), a sequence, and packed."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from amnets_kernels.nn import BlockSparseLSTM

    torch.manual_seed(0)
    dense = torch.nn.LSTM(16, 16, 2, proj_size=proj)
    x_dtype, h_dtype, c_dtype = mix
    inputs = [rand(1, 2, 16).to(x_dtype), rand(4, 2, 16).to(x_dtype)]
    inputs += [pack_padded_sequence(rand(4, 2, 16).to(x_dtype), torch.tensor(lengths)) for lengths in ([4, 2], [4, 4])]
    for module in (LowRankLSTM.from_lstm(dense, rank=16), BlockSparseLSTM.from_lstm(dense, sparsity=0.0,
                                                                                      block_size=16)):
        for x in inputs:
            for hx in (None, (rand(2, 2, proj or 16).to(h_dtype), rand(2, 2, 16).to(c_dtype))):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    want, (want_h, want_c) = dense(x, hx)
                    got, (got_h, got_c) = module(x, hx)
                    got, want = getattr(got, "data", got), getattr(want, "data", want)
                assert (got.dtype, got_h.dtype, got_c.dtype) == (want.dtype, want_h.dtype, want_c.dtype)
                torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05)


def test_every_native_kernel_runs_as_given_under_autocast():
    """The faces' kernels (torch.ops.amnets_native.*) take no casts: under autocast they run in their
    arguments' dtypes, with autocast off inside (their own at:: GEMMs were cast before: a raw dtype error
    from lowrank_lstm_cell_forward at 6 rows). Every one of them has the autocast kernel that does it."""
    native = [name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
              if name.startswith("amnets_native::")]
    assert "lowrank_lstm_cell_forward" in native and "bsr_lstm_stack_step" in native
    for name in native:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"amnets_native::{name}", key), (name, key)
    if DEVICE != "cpu":
        return
    torch.manual_seed(0)
    hidden, d, rank = 32, 24, 8
    w = [rand(4 * hidden, rank), rand(rank, d), rand(4 * hidden, rank), rand(rank, hidden)]
    for batch in (1, 6):  # 6 rows: past the row kernels, the at:: GEMM path
        x, h, c = rand(batch, d), rand(batch, hidden), rand(batch, hidden)
        calls = [lambda: torch.ops.amnets_native.lowrank_lstm_cell_forward(x, h, c, *w, None, False)[:2],
                 lambda: torch.ops.amnets_native.lowrank_lstm_stack_step(x, None, None, w, [None], hidden)]
        for call in calls:
            want = call()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call()
            for g, e in zip(got, want):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g, e)
