"""rnnt_loss: every face against torchaudio (the oracle we must equal), brute-force path sums in
float64, gradcheck; bad input."""

import itertools
import math

import pytest
import torch
import torchaudio
import torchaudio.functional as TAF
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak

from conftest import DEVICE, FACES, use_face
from helpers import grads, label_checks


def batch_of(batch, frames, labels, vocab, blank, dtype=torch.float32, ragged=True, index=torch.int32,
             scale=1.0, device=DEVICE, full=True):
    """Random logits and labels; with `full`, one sequence spans the padded T and U (torchaudio needs it)."""
    logits = (torch.randn(batch, frames, labels + 1, vocab, dtype=torch.float64) * scale).to(dtype)
    blank_id = blank % vocab
    targets = torch.randint(0, vocab - 1, (batch, labels))
    targets = targets + (targets >= blank_id).long()  # never the blank
    logit_lengths = torch.randint(1, frames + 1, (batch,)) if ragged else torch.full((batch,), frames)
    target_lengths = torch.randint(0, labels + 1, (batch,)) if ragged else torch.full((batch,), labels)
    if full:
        logit_lengths[0], target_lengths[-1] = frames, labels
    targets[torch.arange(labels)[None] >= target_lengths[:, None]] = blank_id  # padding may even be blank
    return (logits.to(device).requires_grad_(True), targets.to(device, index), logit_lengths.to(device, index),
            target_lengths.to(device, index))


def torchaudio_loss(logits, targets, logit_lengths, target_lengths, **kw):
    return TAF.rnnt_loss(logits, targets.int(), logit_lengths.int(), target_lengths.int(), **kw)


@pytest.mark.parametrize("face", FACES)
@given(batch=st.integers(1, 4), frames=st.integers(1, 6), labels=st.integers(0, 5), vocab=st.integers(2, 9),
       blank=st.sampled_from([0, -1, 1]), reduction=st.sampled_from(["none", "mean", "sum"]),
       clamp=st.sampled_from([-1.0, 0.05]), fused=st.booleans(), index=st.sampled_from([torch.int32, torch.int64]))
def test_matches_torchaudio(face, batch, frames, labels, vocab, blank, reduction, clamp, fused, index):
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(batch, frames, labels, vocab, blank, index=index)
        kw = dict(blank=blank, clamp=clamp, reduction=reduction, fused_log_softmax=fused)
        prepare = (lambda z: z) if fused else (lambda z: z.log_softmax(-1))  # one graph per loss
        ours = ak.rnnt_loss(prepare(logits), targets, logit_lengths, target_lengths, **kw)
        theirs = torchaudio_loss(prepare(logits).cpu(), targets.cpu(), logit_lengths.cpu(), target_lengths.cpu(),
                                 **kw)
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-5)
        (g_ours,), (g_theirs,) = grads(ours, [logits]), grads(theirs, [logits])
        torch.testing.assert_close(g_ours.cpu(), g_theirs.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vocab, fused, clamp", [(16, True, -1.0), (37, True, 0.01), (100, False, -1.0),
                                                 (257, True, -1.0)])
def test_wide_vocabularies_match_torchaudio(face, vocab, fused, clamp):
    """Vocabularies spanning several SIMD vectors / blocks plus a ragged tail."""
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(3, 7, 5, vocab, 3)
        kw = dict(blank=3, clamp=clamp, reduction="sum", fused_log_softmax=fused)
        prepare = (lambda z: z) if fused else (lambda z: z.log_softmax(-1))
        ours = ak.rnnt_loss(prepare(logits), targets, logit_lengths, target_lengths, **kw)
        theirs = torchaudio_loss(prepare(logits).cpu(), targets.cpu(), logit_lengths.cpu(), target_lengths.cpu(), **kw)
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-5)
        (g_ours,), (g_theirs,) = grads(ours, [logits]), grads(theirs, [logits])
        torch.testing.assert_close(g_ours.cpu(), g_theirs.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(face, dtype):
    """fp16/bf16 logits: computed in fp32 inside; equal torchaudio run on the same rounded logits."""
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(3, 6, 4, 11, 0, dtype=dtype, scale=3)
        ours = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
        assert ours.dtype == dtype
        # torchaudio on the CPU, as everywhere here: its CUDA kernel gave one sequence of this batch a loss
        # 9.6 off (H200, torchaudio 2.11), where our three faces and the CPU torchaudio agree.
        exact = torchaudio_loss(logits.detach().float().cpu(), targets.cpu(), logit_lengths.cpu(),
                                target_lengths.cpu(), blank=0, reduction="none")
        torch.testing.assert_close(ours.float().cpu(), exact.cpu(), rtol=2e-3 if dtype == torch.float16 else 1e-2,
                                   atol=1e-3)
        (g,) = grads(ours, [logits])
        assert g.dtype == dtype and torch.isfinite(g).all()


def brute_force_nll(lp, target, frames, labels):
    """-log P summed over every alignment explicitly (independent of the alpha/beta recursion)."""
    paths = []
    for emits_at in itertools.combinations(range(frames - 1 + labels), labels):
        t = u = 0
        score = 0.0
        for step in range(frames - 1 + labels):
            if step in emits_at:
                score = score + lp[t, u, target[u]]
                u += 1
            else:
                score = score + lp[t, u, -1]
                t += 1
        paths.append(score + lp[frames - 1, labels, -1])  # the final blank
    return -torch.logsumexp(torch.stack(paths), 0)


@given(frames=st.integers(1, 4), labels=st.integers(0, 3), vocab=st.integers(2, 5))
def test_reference_equals_brute_force_path_sum(frames, labels, vocab):
    logits, targets, *_ = batch_of(1, frames, labels, vocab, -1, dtype=torch.float64, ragged=False, device="cpu")
    lp = logits.log_softmax(-1)
    expected = brute_force_nll(lp[0], targets[0].tolist(), frames, labels)
    with ak.use_backend("reference"):
        got = ak.rnnt_loss(logits, targets, torch.tensor([frames]), torch.tensor([labels]), reduction="sum")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(v, logits)[0] for v in (got, expected)), rtol=1e-10, atol=1e-12)


def test_reference_gradcheck_float64():
    logits, targets, logit_lengths, target_lengths = batch_of(3, 4, 3, 5, 0, dtype=torch.float64, device="cpu")
    with ak.use_backend("reference"):
        for fused, clamp in ((True, -1.0), (False, -1.0), (True, 10.0)):
            inputs = logits if fused else logits.detach().log_softmax(-1).requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda z: ak.rnnt_loss(z, targets, logit_lengths, target_lengths, blank=0, clamp=clamp,
                                       reduction="sum", fused_log_softmax=fused), (inputs,))


@pytest.mark.parametrize("face", FACES)
def test_extreme_logits_stay_finite(face):
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(2, 5, 3, 7, 0, scale=1e4)
        loss = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0)
        (g,) = grads(loss, [logits])
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        theirs = torchaudio_loss(logits.detach().cpu(), targets.cpu(), logit_lengths.cpu(), target_lengths.cpu(),
                                 blank=0)
        torch.testing.assert_close(loss.cpu(), theirs, rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_face_cuts_posteriors_below_2_pow_100_so_no_gradient_is_denormal(fused):
    """Peaked logits: the reference's gradient has denormal entries (which make every x86 multiply-add of a
    joint's backward microcode-assisted); the CPU face writes 0 for posterior parts below 2^-100 instead."""
    with use_face("rnnt_loss", "cpu"):
        logits, targets, logit_lengths, target_lengths = batch_of(2, 6, 4, 64, 0, scale=40.0)
        scores = (logits if fused else logits.log_softmax(-1)).detach().requires_grad_(True)  # the op's input
        kw = dict(blank=0, reduction="sum", fused_log_softmax=fused)
        (g,) = grads(ak.rnnt_loss(scores, targets, logit_lengths, target_lengths, **kw), [scores])
    with use_face("rnnt_loss", "reference"):
        (g_ref,) = grads(ak.rnnt_loss(scores, targets, logit_lengths, target_lengths, **kw), [scores])
    tiny = torch.finfo(torch.float32).tiny

    def denormal(t):
        return ((t != 0) & (t.abs() < tiny)).sum().item()

    assert denormal(g_ref) > 0, "the shape no longer produces denormal gradients: the test checks nothing"
    assert denormal(g) == 0
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    cut = (g == 0) & (g_ref != 0)
    # only entries near the cut were dropped (the reference rounds its own way: 16x of slack)
    assert cut.any() and (g_ref[cut].abs() < 2.0 ** -96).all()


@pytest.mark.parametrize("face", FACES)
def test_padding_beyond_longest_sequence(face):
    """Padded T and U larger than every length (torchaudio refuses this; we allow it)."""
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(3, 5, 4, 6, 0, full=False)
        logit_lengths.clamp_(max=3)
        target_lengths.clamp_(max=2)
        ours = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
        trimmed = logits.detach()[:, :3, :3].contiguous().requires_grad_(True)
        theirs = ak.rnnt_loss(trimmed, targets[:, :2], logit_lengths, target_lengths, blank=0, reduction="none")
        torch.testing.assert_close(ours, theirs)
        (g,) = grads(ours, [logits])
        (g_trim,) = grads(theirs, [trimmed])
        torch.testing.assert_close(g[:, :3, :3], g_trim)
        assert not g[:, 3:].any() and not g[:, :, 3:].any()


def test_non_finite_cost_is_reported_and_gets_no_gradient():
    logits, targets, logit_lengths, target_lengths = batch_of(2, 3, 2, 4, 0, device="cpu")
    lp = logits.detach().log_softmax(-1)
    lp[1, :, :, 0] = -math.inf  # sequence 1 can never emit blank: probability 0
    lp.requires_grad_(True)
    with ak.use_backend("reference"), pytest.warns(RuntimeWarning, match=r"sequences \[1\] have a non-finite cost"):
        costs = ak.rnnt_loss(lp, targets, logit_lengths, target_lengths, blank=0, reduction="none",
                             fused_log_softmax=False)
    assert torch.isinf(costs[1]) and torch.isfinite(costs[0])
    (g,) = torch.autograd.grad(costs.sum(), lp)
    assert not g[1].any() and g[0].any() and torch.isfinite(g).all()


@pytest.mark.parametrize("face", FACES)
def test_unfused_scores_far_from_log_probabilities_get_finite_gradients(face):
    """fused_log_softmax=False takes the scores as log-probabilities as given: finite scores of ~100 (positive
    ones too) have finite costs, and the classes off every arc a zero gradient. The cpu face computed those as
    0 * exp(score), NaN past exp's range (score > 88)."""
    torch.manual_seed(0)
    args = batch_of(3, 4, 3, 5, 0, scale=100.0)
    kw = dict(blank=0, reduction="none", fused_log_softmax=False)
    with ak.use_backend("reference"):
        want = ak.rnnt_loss(*args, **kw)
        (g_want,) = grads(want, [args[0]])
    with use_face("rnnt_loss", face):
        got = ak.rnnt_loss(*args, **kw)
        (g,) = grads(got, [args[0]])
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)  # costs ~1e3: the Triton lattice runs in fp32
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-4)


def test_opcheck_and_compile():
    logits, targets, logit_lengths, target_lengths = batch_of(2, 4, 3, 5, 0, device="cpu")
    with ak.use_backend("reference"):
        for fused in (True, False):
            torch.library.opcheck(torch.ops.amnets.rnnt_loss_forward.default,
                                  (logits, targets, logit_lengths, target_lengths, 0, -1.0, fused, True))
        torch.library.opcheck(torch.ops.amnets.rnnt_loss.default,
                              (logits, targets, logit_lengths, target_lengths, 0, 0.5, "sum", True))
        labels = (targets, logit_lengths, target_lengths)
        with torch.no_grad():
            saved = torch.ops.amnets.rnnt_loss_forward(logits, *labels, 0, -1.0, True, True)
        torch.library.opcheck(torch.ops.amnets.rnnt_loss_backward.default,
                              (torch.rand(2), logits.detach(), *labels, *saved, 0, 0.5, True))

        def f(z):
            return torch.ops.amnets.rnnt_loss(z * 2, targets, logit_lengths, target_lengths, 0, -1.0, "mean", True)

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y, y_eager = compiled(logits), f(logits)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(torch.autograd.grad(y, logits)[0], torch.autograd.grad(y_eager, logits)[0])


def test_backward_uses_the_forward_backend():
    logits, targets, logit_lengths, target_lengths = batch_of(2, 4, 3, 5, 0, device="cpu")
    with ak.use_backend("reference"):
        loss = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0)
    with ak.use_backend("cpu"):  # the cpu face does not exist yet; backward must not look for it
        loss.backward()
    assert ak.last_face("rnnt_loss") == "reference"


# ---------------------------------------------------------------------------------------------------
# bad input


def _args():
    logits, targets, logit_lengths, target_lengths = batch_of(2, 4, 3, 5, 0, device="cpu")
    return dict(logits=logits.detach(), targets=targets, logit_lengths=logit_lengths, target_lengths=target_lengths)


@pytest.mark.parametrize("change, kw, error, match", [
    (dict(targets=torch.full((2, 3), 5)), {}, ValueError, r"targets must lie in \[0, V = 5\)"),
    (dict(targets=torch.zeros(2, 3, dtype=torch.int32)), {}, ValueError, r"differ from blank = 0"),
    (dict(targets=torch.zeros(2, 3, dtype=torch.int32)), dict(blank=-5), ValueError, r"differ from blank = 0"),
    (dict(targets=torch.ones(2, 4, dtype=torch.int32)), {}, ValueError, r"targets must have shape \(B, U\) = \(2, 3\)"),
    (dict(targets=torch.ones(2, 3)), {}, TypeError, r"targets must have dtype in \(int32, int64\)"),
    (dict(logit_lengths=torch.tensor([4, -1])), {}, ValueError, r"logit_lengths must lie in \[1, 4\]"),
    (dict(logit_lengths=torch.tensor([5, 2])), {}, ValueError, r"logit_lengths must lie in \[1, 4\] \(padded T = 4\)"),
    (dict(logit_lengths=torch.tensor([0, 2])), {}, ValueError, r"logit_lengths must lie in \[1, 4\]"),
    (dict(target_lengths=torch.tensor([4, 2])), {}, ValueError, r"target_lengths must lie in \[0, 3\] \(padded U = 3\)"),
    (dict(target_lengths=torch.tensor([-1, 2])), {}, ValueError, r"target_lengths must lie in \[0, 3\]"),
    (dict(target_lengths=torch.tensor([1, 2, 3])), {}, ValueError, r"target_lengths must have shape \(B,\) = \(2,\)"),
    (dict(logits=torch.zeros(2, 4, 4)), {}, ValueError, r"logits must be 4-D"),
    (dict(logits=torch.zeros(2, 4, 4, 5, dtype=torch.int32)), {}, TypeError, r"logits must have dtype"),
    (dict(logits=torch.zeros(3, 4, 4, 5)), {}, ValueError, r"targets must have shape \(B, U\) = \(3, 3\)"),
    ({}, dict(blank=5), ValueError, r"blank must be in \[-V, V\) = \[-5, 5\)"),
    ({}, dict(reduction="avg"), ValueError, r"reduction must be one of"),
])
def test_bad_arguments(change, kw, error, match):
    args = _args()
    args.update(change)
    kw = {"blank": 0, **kw}
    with ak.use_backend("reference"), pytest.raises(error, match="rnnt_loss: .*" + match):
        ak.rnnt_loss(*args.values(), **kw)


@given(data=st.data())
def test_fuzz_lengths_and_labels_never_crash(data):
    """Random (often invalid) integer inputs: a clear ValueError or a finite loss, nothing else."""
    batch, frames, labels, vocab = (data.draw(st.integers(1, 4)) for _ in range(4))
    logits = torch.randn(batch, frames, labels + 1, vocab)
    ints = st.integers(-3, 8)
    targets = torch.tensor(data.draw(st.lists(st.lists(ints, min_size=labels, max_size=labels),
                                              min_size=batch, max_size=batch)), dtype=torch.int64).view(batch, labels)
    logit_lengths = torch.tensor(data.draw(st.lists(ints, min_size=batch, max_size=batch)))
    target_lengths = torch.tensor(data.draw(st.lists(ints, min_size=batch, max_size=batch)))
    blank = data.draw(st.integers(-vocab - 1, vocab))
    with ak.use_backend("reference"):
        try:
            loss = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=blank)
        except ValueError as exc:
            assert str(exc).startswith("rnnt_loss: ")
        else:
            assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------
# device label checks (the CUDA default: no host sync; forced here on any device)


@pytest.fixture
def device_label_checks():
    with label_checks("device"):
        yield


BAD_SEQUENCES = {  # sequence -> how its labels are broken (batch of 5: 0 and 4 stay valid)
    1: ("logit_lengths", 9),  # > T = 4
    2: ("targets", 0),  # the blank, within target_lengths
    3: ("target_lengths", 7),  # > U = 3
}


def _corrupted(device):
    logits, targets, logit_lengths, target_lengths = batch_of(5, 4, 3, 6, 0, device=device, ragged=False)
    bad_targets, bad_frames, bad_labels = targets.clone(), logit_lengths.clone(), target_lengths.clone()
    bad_frames[1] = 9
    bad_targets[2, 1] = 0
    bad_labels[3] = 7
    return logits, (targets, logit_lengths, target_lengths), (bad_targets, bad_frames, bad_labels)


@pytest.mark.parametrize("face", FACES)
def test_device_label_checks_give_bad_sequences_nan_and_no_gradient(face, device_label_checks):
    """Out-of-range lengths and labels, never read on the host: those sequences' costs are NaN and their
    gradient zero; the good sequences' costs and gradients are what host checks give."""
    logits, good, bad = _corrupted(DEVICE)
    with use_face("rnnt_loss", face):
        costs = ak.rnnt_loss(logits, *bad, blank=0, reduction="none")
        (grad,) = torch.autograd.grad(costs.nan_to_num().sum(), logits)
        want = ak.rnnt_loss(logits, *good, blank=0, reduction="none")
        (want_grad,) = torch.autograd.grad(want.sum(), logits)
        zeroed = ak.rnnt_loss(logits, *bad, blank=0, zero_infinity=True)
    broken = torch.tensor([b in BAD_SEQUENCES for b in range(5)], device=DEVICE)
    assert torch.isnan(costs[broken]).all() and torch.isfinite(costs[~broken]).all()
    torch.testing.assert_close(costs[~broken], want[~broken])
    assert (grad[broken] == 0).all()
    torch.testing.assert_close(grad[~broken], want_grad[~broken])
    torch.testing.assert_close(zeroed, want[~broken].sum() / 5)  # zero_infinity: a bad sequence counts 0


def test_device_label_checks_in_the_fused_joint(device_label_checks):
    torch.manual_seed(1)
    enc, pred = torch.randn(5, 4, 6, device=DEVICE), torch.randn(5, 4, 6, device=DEVICE)
    weight, bias = torch.randn(6, 6, device=DEVICE), torch.randn(6, device=DEVICE)
    _, good, bad = _corrupted(DEVICE)
    costs = ak.fused_joint_rnnt_loss(enc, pred, weight, bias, *bad, blank=0, reduction="none")
    want = ak.fused_joint_rnnt_loss(enc, pred, weight, bias, *good, blank=0, reduction="none")
    broken = torch.tensor([b in BAD_SEQUENCES for b in range(5)], device=DEVICE)
    assert torch.isnan(costs[broken]).all()
    torch.testing.assert_close(costs[~broken], want[~broken])


@pytest.mark.parametrize("checks", ["host", "device"])
def test_targets_and_lengths_may_mix_int32_and_int64_under_either_label_check(checks):
    """int32 and int64 index tensors mix (the docstring: each may be either), under host and device checks alike:
    device checks refused a mix with a TypeError, so code that ran on the CPU failed on CUDA."""
    logits, targets, logit_lengths, target_lengths = batch_of(3, 4, 3, 6, 0, device=DEVICE)
    want = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
    with label_checks(checks):
        for t, f, u in ((targets.long(), logit_lengths.int(), target_lengths.int()),
                        (targets.int(), logit_lengths.long(), target_lengths.int())):
            torch.testing.assert_close(ak.rnnt_loss(logits, t, f, u, blank=0, reduction="none"), want)
        with pytest.raises(TypeError, match="logit_lengths must have dtype in"):
            ak.rnnt_loss(logits, targets, logit_lengths.float(), target_lengths, blank=0)


@given(batch=st.integers(1, 5), max_labels=st.integers(0, 5),
       wide=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**31 - 1))
def test_device_labels_op_against_its_rules_spelled_out(batch, max_labels, wide, seed):
    """torch.ops.amnets_native.rnnt_device_labels, what device label checks run (tensor ops; on CUDA one kernel of
    csrc/cuda/rnnt.cu), against its rules as a loop: a sequence is bad when its lengths leave [1, T] / [0, U] or a
    label within its length leaves [0, V) or is the blank; a bad one runs as 1 frame and 0 labels; every target is
    clamped into [0, V). Values around every bound, and int64 values that would wrap into range as int32."""
    frames, vocab, blank = 4, 5, 1
    g = torch.Generator().manual_seed(seed)
    def pick(pool, shape, is_wide):
        pool = torch.tensor(pool if is_wide else [v for v in pool if abs(v) < 2**31])
        return pool[torch.randint(0, len(pool), shape, generator=g)].to(torch.int64 if is_wide else torch.int32)
    targets = pick([-2**33, -1, 0, 1, 2, 3, 4, 5, 2**32 + 2, 0, 2, 3, 4, 0, 2, 3, 4], (batch, max_labels), wide[0])
    logit_lengths = pick([-2**32 + 3, -1, 0, 1, 2, 3, 4, 5, 2, 4, 2**32 + 1], (batch,), wide[1])
    target_lengths = pick(list(range(-1, max_labels + 2)) + [max_labels] * 3 + [2**32], (batch,), wide[2])
    got = torch.ops.amnets_native.rnnt_device_labels(targets.to(DEVICE), logit_lengths.to(DEVICE),
                                                     target_lengths.to(DEVICE), frames, vocab, blank, "rnnt_loss")
    want_bad = []
    for b in range(batch):
        f, u = int(logit_lengths[b]), int(target_lengths[b])
        labels = [int(y) for y in targets[b, :max(u, 0)]]
        want_bad.append(not 1 <= f <= frames or not 0 <= u <= max_labels
                        or any(not 0 <= y < vocab or y == blank for y in labels))
    want_bad = torch.tensor(want_bad)
    assert [t.dtype for t in got] == [torch.int32] * 3 + [torch.bool]
    assert all(t.device == torch.device(DEVICE) or DEVICE == "cuda" and t.is_cuda for t in got)
    torch.testing.assert_close(got[3].cpu(), want_bad)
    torch.testing.assert_close(got[0].cpu(), targets.clamp(0, vocab - 1).int(), rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu(), logit_lengths.masked_fill(want_bad, 1).int(), rtol=0, atol=0)
    torch.testing.assert_close(got[2].cpu(), target_lengths.masked_fill(want_bad, 0).int(), rtol=0, atol=0)


def test_device_labels_op_refuses_bad_arguments_by_name():
    """The op called directly (it is public in torch.ops.amnets_native): shapes, dtypes, devices and the lattice's
    sizes are checked before any kernel reads the labels, with the loss named in the message."""
    op = torch.ops.amnets_native.rnnt_device_labels
    t, f, u = (torch.zeros(3, 2, dtype=torch.int32, device=DEVICE), torch.ones(3, dtype=torch.int32, device=DEVICE),
               torch.zeros(3, dtype=torch.int64, device=DEVICE))
    cases = [((t[0], f, u, 4, 5, 0), ValueError, "rnnt_loss: targets must be 2-D"),
             ((t.float(), f, u, 4, 5, 0), TypeError, "rnnt_loss: targets must have dtype in"),
             ((t, f[:2], u, 4, 5, 0), ValueError, r"rnnt_loss: logit_lengths must have shape \(B,\) = \(3,\)"),
             ((t, f, u.reshape(3, 1), 4, 5, 0), ValueError, "rnnt_loss: target_lengths must be 1-D"),
             ((t, f, u, 0, 5, 0), ValueError, r"rnnt_loss: the lattice \(B, T, U\+1, V\) must have every dim >= 1"),
             ((t, f, u, 4, 5, 5), ValueError, r"rnnt_loss: blank must be in \[0, V = 5\); got 5"),
             ((t[:0], f[:0], u[:0], 4, 5, 0), ValueError, "rnnt_loss: the lattice"),
             ((t, f.cpu() if DEVICE != "cpu" else f.to("meta"), u, 4, 5, 0), ValueError,
              "rnnt_loss: logit_lengths is on .* but targets is on .*; all tensors must be on one device")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args, "rnnt_loss")


def test_label_check_modes():
    assert ak.get_label_checks() == "auto"
    with pytest.raises(ValueError, match=r"label checks must be one of \('auto', 'host', 'device'\); got 'gpu'"):
        ak.set_label_checks("gpu")


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs exist on a GPU")
def test_rnnt_loss_never_syncs_on_cuda():
    logits, targets, logit_lengths, target_lengths = batch_of(4, 6, 3, 8, 0)
    ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0).backward()  # warm-up (workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ak.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_loss_modules_script_as_torchaudios_does():
    """torchaudio's RNNTLoss scripts (TorchScript), so a model holding it did; after swap_in(loss=True) it still
    does, and the scripted losses and gradients equal eager. The modules' repr names every setting."""
    logits, targets, logit_lengths, target_lengths = batch_of(2, 5, 3, 6, 0, device=DEVICE)
    loss = ak.nn.RNNTLoss(blank=0, clamp=0.5, zero_infinity=True)
    for module, args in ((loss, (logits,)),
                         (ak.nn.FusedJointRNNTLoss(8, 6, blank=0).to(DEVICE),
                          (torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 4, 8, device=DEVICE)))):
        args = tuple(a.detach().requires_grad_() for a in args)
        scripted = torch.jit.script(module)
        for got, want in zip(torch.autograd.grad(scripted(*args, targets, logit_lengths, target_lengths), args),
                             torch.autograd.grad(module(*args, targets, logit_lengths, target_lengths), args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "fused_log_softmax=True, zero_infinity=True" in repr(loss)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.joint, self.loss = torch.nn.Linear(4, 6), torchaudio.transforms.RNNTLoss(blank=0)

        def forward(self, x, t, a, b):
            return self.loss(self.joint(x), t, a, b)

    net = ak.swap_in(Net(), loss=True).to(DEVICE)
    assert isinstance(net.loss, ak.nn.RNNTLoss)
    x = torch.randn(2, 5, 4, 4, device=DEVICE)
    torch.testing.assert_close(torch.jit.script(net)(x, targets, logit_lengths, target_lengths),
                               net(x, targets, logit_lengths, target_lengths), rtol=0, atol=0)
