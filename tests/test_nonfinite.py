"""Non-finite input behaves the same on every face (the documented contract): a NaN or +inf logit (or a NaN
in a fused joint's input) makes that sequence's cost non-finite, says so in a RuntimeWarning, and gives it a
zero gradient; the other sequences' costs and gradients, and gradients the batch shares, stay as without it.
A cost that only overflows fp16 is reported as that, and keeps its gradient. The report is the host label
checks' (the CPU default): CUDA tensors are checked on the device by default, which reports nothing (reading
the costs would sync), so this module runs under set_label_checks("host") on every device."""

import pytest
import torch

import amnets_kernels as ak

from conftest import DEVICE, FACES, use_face
from helpers import label_checks


@pytest.fixture(autouse=True)
def host_label_checks():
    with label_checks("host"):
        yield


def labels(batch, frames, labels_, vocab):
    targets = torch.randint(1, vocab, (batch, labels_), device=DEVICE)
    return (targets, torch.full((batch,), frames, device=DEVICE), torch.full((batch,), labels_, device=DEVICE))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rnnt_non_finite_logit_poisons_only_its_sequence(face, bad):
    logits = torch.randn(2, 5, 4, 7, device=DEVICE)
    targets, frames, lengths = labels(2, 5, 3, 7)
    clean = logits[:1].clone().requires_grad_(True)
    logits[1, 2, 1, 3] = bad
    logits.requires_grad_(True)
    with use_face("rnnt_loss", face):
        with pytest.warns(RuntimeWarning, match=r"sequences \[1\] have a non-finite cost.*gradient is zero"):
            costs = ak.rnnt_loss(logits, targets, frames, lengths, blank=0, reduction="none")
        alone = ak.rnnt_loss(clean, targets[:1], frames[:1], lengths[:1], blank=0, reduction="none")
    assert not torch.isfinite(costs[1])
    (grad,) = torch.autograd.grad(costs.nansum(), logits)
    (grad_alone,) = torch.autograd.grad(alone.sum(), clean)
    assert not grad[1].any(), "a non-finite cost gets a zero gradient"
    torch.testing.assert_close(costs[:1], alone)
    torch.testing.assert_close(grad[:1], grad_alone)


@pytest.mark.parametrize("face", FACES)
def test_fused_joint_nan_in_one_utterance_keeps_shared_gradients_finite(face):
    enc, pred = torch.randn(2, 4, 6, device=DEVICE), torch.randn(2, 3, 6, device=DEVICE)
    enc[1, 1, 2] = float("nan")
    weight, bias = torch.randn(5, 6, device=DEVICE) / 3, torch.randn(5, device=DEVICE)
    targets, frames, lengths = labels(2, 4, 2, 5)
    inputs = [t.clone().requires_grad_(True) for t in (enc, pred, weight, bias)]
    alone = [t.clone().requires_grad_(True) for t in (enc[:1], pred[:1], weight, bias)]
    with use_face("fused_joint_rnnt_loss", face):
        with pytest.warns(RuntimeWarning, match=r"sequences \[1\] have a non-finite cost"):
            costs = ak.fused_joint_rnnt_loss(*inputs, targets, frames, lengths, blank=0, reduction="none")
        single = ak.fused_joint_rnnt_loss(*alone, targets[:1], frames[:1], lengths[:1], blank=0, reduction="none")
    assert torch.isnan(costs[1]) and torch.isfinite(costs[0])
    grads = torch.autograd.grad(costs.nansum(), inputs)
    grads_alone = torch.autograd.grad(single.sum(), alone)
    assert not grads[0][1].any() and not grads[1][1].any(), "the bad utterance's enc/pred get no gradient"
    for got, want in zip((grads[0][:1], grads[1][:1], grads[2], grads[3]), grads_alone):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("face", FACES)
def test_fp16_cost_overflow_is_reported_as_an_overflow_and_keeps_its_gradient(face):
    # Blank costs ~40000 nats a frame: the cost (~80000) is finite in float32 and overflows fp16 (65504).
    logits = torch.zeros(1, 2, 1, 3, device=DEVICE)
    logits[..., 0] = -40000.0
    logits = logits.half().requires_grad_(True)
    targets = torch.zeros(1, 0, dtype=torch.int32, device=DEVICE)
    frames, lengths = torch.tensor([2], device=DEVICE), torch.tensor([0], device=DEVICE)
    with use_face("rnnt_loss", face):
        with pytest.warns(RuntimeWarning, match=r"costs of sequences \[0\] overflow torch.float16.*computed"):
            cost = ak.rnnt_loss(logits, targets, frames, lengths, blank=0, reduction="none")
    assert torch.isinf(cost[0])
    (grad,) = torch.autograd.grad(cost.float().sum(), logits)
    assert torch.isfinite(grad).all() and grad.any()


def test_zero_infinity_keeps_a_batch_loss_finite():
    """zero_infinity (as ctc_loss): the bad utterance counts 0; the clean one's loss and gradients are
    what they are alone, and the shared weight's gradient is finite."""
    torch.manual_seed(0)
    enc, pred = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    enc[1, 2, 0] = float("nan")
    weight = torch.randn(6, 8, requires_grad=True)
    targets = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    frames, labels = torch.tensor([5, 5], dtype=torch.int32), torch.tensor([2, 2], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="non-finite cost"):
        loss = ak.fused_joint_rnnt_loss(enc, pred, weight, None, targets, frames, labels, blank=0,
                                        reduction="sum", zero_infinity=True)
    clean = ak.fused_joint_rnnt_loss(enc[:1], pred[:1], weight, None, targets[:1], frames[:1], labels[:1], blank=0,
                                     reduction="sum")
    assert torch.isfinite(loss) and torch.allclose(loss, clean)
    grad, = torch.autograd.grad(loss, weight)
    grad_clean, = torch.autograd.grad(clean, weight)
    assert torch.allclose(grad, grad_clean)
    logits = torch.randn(2, 4, 3, 5)
    logits[0, 1, 1, 2] = float("inf")
    with pytest.warns(RuntimeWarning):
        costs = ak.rnnt_loss(logits, targets[:, :2] % 4 + 1, torch.tensor([4, 4]), labels, blank=0,
                             reduction="none", zero_infinity=True)
    assert costs[0] == 0 and torch.isfinite(costs).all()


SCALARS = [(dict(clamp="x"), "clamp must be a float; got str"), (dict(blank=0.0), "blank must be an int; got float"),
           (dict(reduction=None), "reduction must be a str; got NoneType"),
           # torch.ops took True as blank 1 and 1 as a flag
           (dict(blank=True), "blank must be an int; got bool"),
           (dict(zero_infinity=1), "zero_infinity must be a bool")]
# Values no int64 / double holds: torch.ops said "Expected a value of type 'int' ... but instead found type 'int'";
# a NaN clamp meant "no clamp", silently.
BAD_VALUES = [(dict(blank=2**70), r"blank must be an index in \[-V, V\)"), (dict(blank=-2**70), "blank must be an"),
              (dict(clamp=10**400), "clamp must be a float .* got an int of 1329 bits"),
              (dict(clamp=float("nan")), r"clamp must be a number \(<= 0: no clamp\); got nan")]


@pytest.mark.parametrize("kwargs, match", SCALARS)
def test_scalar_arguments_named(kwargs, match):
    logits = torch.randn(1, 2, 2, 3)
    with pytest.raises(TypeError, match=match):
        ak.rnnt_loss(logits, torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]), **kwargs)


@pytest.mark.parametrize("kwargs, match", SCALARS + [(dict(activation=None), "activation must be a str; got NoneType")])
def test_fused_joint_scalar_arguments_named(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ak.fused_joint_rnnt_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(3, 4), None,
                                 torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]), **kwargs)


def test_rnnt_loss_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="fused_log_softmax must be a bool; got int"):
        ak.rnnt_loss(torch.randn(1, 2, 2, 3), torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]),
                     fused_log_softmax=1)


@pytest.mark.parametrize("kwargs, match", BAD_VALUES)
def test_scalar_values_no_kernel_takes_are_named(kwargs, match):
    args = (torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(ValueError, match=match):
        ak.rnnt_loss(torch.randn(1, 2, 2, 3), *args, **kwargs)
    with pytest.raises(ValueError, match=match):
        ak.fused_joint_rnnt_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(3, 4), None, *args, **kwargs)
