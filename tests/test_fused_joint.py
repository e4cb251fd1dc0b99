"""fused_joint_rnnt_loss: every face against the materialised joint + torchaudio rnnt_loss."""

import pytest
import torch
import torchaudio.functional as TAF
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak

from conftest import DEVICE, FACES, use_face
from helpers import close, grads, rand
from test_rnnt import batch_of

ACT = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda a: a}


def joint_inputs(batch, frames, labels, hidden, vocab, blank=0, dtype=torch.float32, has_bias=True, device=DEVICE):
    _, targets, logit_lengths, target_lengths = batch_of(batch, frames, labels, vocab, blank, device=device)
    enc = rand(batch, frames, hidden, dtype=dtype, device=device, requires_grad=True)
    pred = rand(batch, labels + 1, hidden, dtype=dtype, device=device, requires_grad=True)
    weight = rand(vocab, hidden, dtype=dtype, device=device, requires_grad=True, scale=hidden ** -0.5)
    bias = rand(vocab, dtype=dtype, device=device, requires_grad=True) if has_bias else None
    return enc, pred, weight, bias, targets, logit_lengths, target_lengths


def materialised(enc, pred, weight, bias, activation):
    logits = ACT[activation](enc[:, :, None] + pred[:, None]) @ weight.T
    return logits if bias is None else logits + bias


@pytest.mark.parametrize("face", FACES)
@given(batch=st.integers(1, 3), frames=st.integers(1, 5), labels=st.integers(0, 4), hidden=st.integers(1, 6),
       vocab=st.integers(2, 8), activation=st.sampled_from(["tanh", "relu", "identity"]),
       reduction=st.sampled_from(["none", "mean", "sum"]), clamp=st.sampled_from([-1.0, 0.02]),
       has_bias=st.booleans(), blank=st.sampled_from([0, -1]))
def test_matches_materialised_joint_and_torchaudio(face, batch, frames, labels, hidden, vocab, activation,
                                                   reduction, clamp, has_bias, blank):
    with use_face("fused_joint_rnnt_loss", face):
        enc, pred, weight, bias, targets, logit_lengths, target_lengths = joint_inputs(
            batch, frames, labels, hidden, vocab, blank, has_bias=has_bias)
        kw = dict(blank=blank, clamp=clamp, reduction=reduction)
        ours = ak.fused_joint_rnnt_loss(enc, pred, weight, bias, targets, logit_lengths, target_lengths,
                                        activation=activation, **kw)
        logits = materialised(enc, pred, weight, bias, activation)
        theirs = TAF.rnnt_loss(logits.cpu(), targets.int().cpu(), logit_lengths.int().cpu(),
                               target_lengths.int().cpu(), **kw)
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-5)
        inputs = [enc, pred, weight, bias]
        for g, e in zip(grads(ours, inputs), grads(theirs, inputs)):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g.cpu(), e.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("frames, labels, vocab", [(70, 4, 40), (3, 300, 19)])
def test_long_sequences_and_wide_vocab(face, frames, labels, vocab):
    """Lattices larger than one tile of cells (both ways round) and vocabularies past one vector,
    against the float64 oracle: at U=300 torchaudio's own fp32 gradients are off by 1e-2 here."""
    with use_face("fused_joint_rnnt_loss", face):
        args = joint_inputs(2, frames, labels, 8, vocab, blank=0)
        ours = ak.fused_joint_rnnt_loss(*args, blank=0, reduction="sum")
        exact = [a.detach().double().requires_grad_(True) for a in args[:4]]
        with ak.use_backend("reference"):
            expected = ak.fused_joint_rnnt_loss(*exact, *args[4:], blank=0, reduction="sum")
        torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
        for g, e in zip(grads(ours, list(args[:4])), grads(expected, exact)):
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(face, dtype):
    with use_face("fused_joint_rnnt_loss", face):
        args = joint_inputs(2, 4, 3, 8, 6, dtype=dtype)
        ours = ak.fused_joint_rnnt_loss(*args, blank=0, reduction="none")
        assert ours.dtype == dtype
        exact = ak.rnnt_loss(materialised(*(a.detach().double() for a in args[:4]), "tanh"), *args[4:],
                             blank=0, reduction="none")
        close(ours, exact.to(dtype).double(), dtype, scale=10)
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads(ours, list(args[:4])))


@pytest.mark.parametrize("face", FACES)
def test_padding_holding_nan_and_inf_reaches_nothing(face):
    """Frames past T_b and label positions past U_b are padding and may hold anything: NaN and inf there
    change no cost and no gradient (the CUDA face computes every lattice cell, padding included, and must
    skip the dead ones), and the padding's own gradient is 0."""
    enc, pred, weight, bias, targets, _, _ = joint_inputs(3, 5, 3, 6, 7)
    frames = torch.tensor([5, 3, 2], device=DEVICE)
    lengths = torch.tensor([3, 1, 0], device=DEVICE)
    dead_t = torch.arange(5, device=DEVICE)[None, :] >= frames[:, None]
    dead_u = torch.arange(4, device=DEVICE)[None, :] > lengths[:, None]
    with use_face("fused_joint_rnnt_loss", face):
        costs = []
        for fill in (0.0, float("nan"), float("inf")):
            inputs = [enc.detach().masked_fill(dead_t[..., None], fill).requires_grad_(True),
                      pred.detach().masked_fill(dead_u[..., None], -fill).requires_grad_(True),
                      weight, bias]
            cost = ak.fused_joint_rnnt_loss(*inputs, targets, frames, lengths, blank=0, reduction="none")
            costs.append((cost, grads(cost, inputs)))
    (clean, clean_grads), *poisoned = costs
    assert torch.isfinite(clean).all()
    for cost, got in poisoned:
        torch.testing.assert_close(cost, clean)
        for g, want in zip(got, clean_grads):
            torch.testing.assert_close(g, want)
        assert not got[0][dead_t].any() and not got[1][dead_u].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs exist on a GPU")
@pytest.mark.parametrize("face", [f for f in FACES if f in ("cuda", "triton")])
def test_fused_joint_never_syncs_on_cuda(face):
    with use_face("fused_joint_rnnt_loss", face):
        args = joint_inputs(3, 6, 3, 8, 9)
        ak.fused_joint_rnnt_loss(*args, blank=0).backward()  # warm-up (workspaces, compiles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = ak.fused_joint_rnnt_loss(*args, blank=0)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_reference_gradcheck_float64():
    args = joint_inputs(2, 3, 2, 3, 4, dtype=torch.float64, device="cpu")
    with ak.use_backend("reference"):
        for activation in ("tanh", "relu", "identity"):
            assert torch.autograd.gradcheck(
                lambda e, p, w, b: ak.fused_joint_rnnt_loss(e, p, w, b, *args[4:], blank=0, activation=activation),
                args[:4])


def test_opcheck_and_compile():
    args = joint_inputs(2, 3, 2, 4, 5, device="cpu")
    with ak.use_backend("reference"):
        torch.library.opcheck(torch.ops.amnets.fused_joint_rnnt_loss_forward.default, (*args, 0, "tanh", -1.0, True))
        torch.library.opcheck(torch.ops.amnets.fused_joint_rnnt_loss.default, (*args, 0, "relu", 1.0, "sum"))
        with torch.no_grad():
            saved = torch.ops.amnets.fused_joint_rnnt_loss_forward(*args, 0, "tanh", -1.0, True)
        torch.library.opcheck(torch.ops.amnets.fused_joint_rnnt_loss_backward.default,
                              (torch.rand(2), *(a.detach() for a in args[:4]), *args[4:], *saved, 0, "tanh", 0.5))

        def f(enc, pred, weight, bias):
            return torch.ops.amnets.fused_joint_rnnt_loss(enc, pred, weight, bias, *args[4:], 0, "tanh", -1.0, "mean")

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y, y_eager = compiled(*args[:4]), f(*args[:4])
        close(y, y_eager)
        for g, e in zip(torch.autograd.grad(y, args[:4]), torch.autograd.grad(y_eager, args[:4])):
            close(g, e)


@pytest.mark.parametrize("change, kw, error, match", [
    (dict(pred=torch.zeros(2, 3, 5)), {}, ValueError, r"pred must have shape \(B, U\+1, H\) = \(2, U\+1, 4\)"),
    (dict(weight=torch.zeros(5, 3)), {}, ValueError, r"weight must have shape \(V, H\) = \(V, 4\)"),
    (dict(bias=torch.zeros(4)), {}, ValueError, r"bias must have shape \(V,\) = \(5,\)"),
    (dict(enc=torch.zeros(2, 3, 4, dtype=torch.float64)), {}, TypeError, r"pred has dtype torch.float32"),
    ({}, dict(activation="gelu"), ValueError, r"activation must be one of"),
    (dict(targets=torch.full((2, 2), 7)), {}, ValueError, r"targets must lie in \[0, V = 5\)"),
    (dict(logit_lengths=torch.tensor([4, 1])), {}, ValueError, r"logit_lengths must lie in \[1, 3\]"),
])
def test_bad_arguments(change, kw, error, match):
    names = ["enc", "pred", "weight", "bias", "targets", "logit_lengths", "target_lengths"]
    args = dict(zip(names, (a.detach() if a is not None and a.is_floating_point() else a
                            for a in joint_inputs(2, 3, 2, 4, 5, device="cpu"))))
    args.update(change)
    with ak.use_backend("reference"), pytest.raises(error, match="fused_joint_rnnt_loss: .*" + match):
        ak.fused_joint_rnnt_loss(*args.values(), **{"blank": 0, **kw})
