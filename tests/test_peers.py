"""The rnnt_loss peers benchmarks/rnnt.py times (fast_rnnt, optimized_transducer; `make peers`): labelled in
the table when absent; when installed, the same loss and gradient as torchaudio."""

import sys

import pytest
import torch
import torchaudio.functional as TAF

from benchmarks import rnnt

CPU = torch.device("cpu")


def test_absent_peers_are_labelled_skipped(monkeypatch):
    for name in rnnt.PEERS:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    for case in rnnt.loss_cases(CPU, quick=True):
        for name in rnnt.PEERS:
            assert (name, "not installed: make peers") in case.skipped
        assert not {c.label for c in case.others} & set(rnnt.PEERS)


def test_a_peer_with_another_loss_fails_its_row_not_timed():
    call = rnnt._matching(lambda: torch.tensor(2.0), lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="is not torchaudio's"):
        call()
    assert float(rnnt._matching(lambda: torch.tensor(1.0), lambda: torch.tensor(1.0 + 1e-5))()) == 1.0


@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("name", list(rnnt.PEERS))
def test_installed_peer_gives_torchaudios_loss_and_gradient(name, ragged):
    module = pytest.importorskip(name)
    torch.manual_seed(0)
    # ragged: optimized_transducer's compact layout then drops each row's padding
    frames, labels = (torch.tensor([6, 4, 5] if ragged else [6, 6, 6], dtype=torch.int32),
                      torch.tensor([3, 1, 2] if ragged else [3, 3, 3], dtype=torch.int32))
    logits = torch.randn(3, 6, 4, 7, requires_grad=True)
    targets = torch.randint(1, 7, (3, 3), dtype=torch.int32)
    args = (logits, targets, frames, labels)
    want = TAF.rnnt_loss(*args, blank=0)
    (want_grad,) = torch.autograd.grad(want, logits)
    before = logits.detach().clone()
    got = rnnt.PEERS[name](module, *args)()
    # (None: optimized_transducer on full lattices works on its own copy, as it overwrites its logits)
    (got_grad,) = torch.autograd.grad(got, logits, allow_unused=True)
    assert torch.equal(logits, before)  # the other candidates' logits are left as they were
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    if got_grad is None:
        assert name == "optimized_transducer" and not ragged
        return
    for b, (t, u) in enumerate(zip(frames.tolist(), labels.tolist())):  # padding's gradient is not defined
        torch.testing.assert_close(got_grad[b, :t, :u + 1], want_grad[b, :t, :u + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(rnnt.PEERS))
def test_installed_peer_is_an_other_candidate_of_every_loss_case(name):
    pytest.importorskip(name)
    for case in rnnt.loss_cases(CPU, quick=True):
        peer = next(c for c in case.others if c.label == name)
        assert peer.kind == "other" and name not in dict(case.skipped)
        peer.fn()  # its first call checks the loss against torchaudio's (raises if not the same)
