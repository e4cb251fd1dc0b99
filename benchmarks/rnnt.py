"""rnnt_loss against torchaudio's rnnt_loss, and fused_joint_rnnt_loss against materialising the
joint in PyTorch (then torchaudio, or our rnnt_loss). Headline shapes below. rnnt_loss is also timed
against the peers users would pick instead, fast_rnnt and optimized_transducer, where installed
(`make peers`)."""

import importlib
import math

import torch
import torchaudio.functional as TAF

import amnets_kernels as ak

from .harness import DTYPE_NAMES, Candidate, Case, backward_of, everything, face_candidates, inference

LOSS_FULL = dict(shapes=[(16, 100, 30, 512), (8, 200, 50, 1024), (32, 150, 40, 28), (4, 500, 100, 4096)],
                 dtypes=[torch.float32, torch.float16], modes=["fwd", "fwd+bwd"])
LOSS_QUICK = dict(shapes=[(4, 30, 10, 64)], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"])
JOINT_FULL = dict(shapes=[(8, 200, 50, 320, 1024)], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"])
JOINT_QUICK = dict(shapes=[(2, 20, 8, 32, 64)], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"])
# The reference face keeps several float copies of the 4-D logits and loops over the lattice in Python.
REFERENCE_MAX_LOGITS = 1e8


def _labels(batch, frames, labels, vocab, device):
    targets = torch.randint(1, vocab, (batch, labels), dtype=torch.int32, device=device)
    logit_lengths = torch.full((batch,), frames, dtype=torch.int32, device=device)
    target_lengths = torch.full((batch,), labels, dtype=torch.int32, device=device)
    return targets, logit_lengths, target_lengths


def _reference_note(cells):
    return (f"reference face not timed above {REFERENCE_MAX_LOGITS:.0e} logits (it keeps several copies "
            "and loops over the lattice in Python)") if cells > REFERENCE_MAX_LOGITS else None


def _fast_rnnt(fast_rnnt, logits, targets, logit_lengths, target_lengths):
    symbols, zeros = targets.long(), torch.zeros_like(logit_lengths)
    boundary = torch.stack([zeros, zeros, target_lengths, logit_lengths], 1).long()  # [0, 0, U_i, T_i]
    return lambda: fast_rnnt.rnnt_loss(logits, symbols, termination_symbol=0, boundary=boundary,
                                       reduction="mean")


def _optimized_transducer(ot, logits, targets, logit_lengths, target_lengths):
    # Its compact layout: row b's (T_b, U_b+1) lattice flattened, rows concatenated: (sum T_b (U_b+1), V).
    # Logits that require grad it overwrites with their gradient (its docstring), so when no padding is to
    # be dropped it gets its own copy (made on its first call), and the other candidates' logits stay logits.
    batch, frames, labels1, vocab = logits.shape
    spans = list(zip(logit_lengths.tolist(), (target_lengths + 1).tolist()))
    own = []

    def compact():
        if any(span != (frames, labels1) for span in spans):
            return torch.cat([logits[b, :t, :u].reshape(-1, vocab) for b, (t, u) in enumerate(spans)])
        if not own:
            own.append(logits.detach().clone().requires_grad_() if logits.requires_grad else logits)
        return own[0].view(-1, vocab)  # a view: no copy in the timed call

    return lambda: ot.transducer_loss(compact(), targets, logit_lengths, target_lengths, blank=0,
                                      reduction="mean", from_log_softmax=False)


PEERS = {"fast_rnnt": _fast_rnnt, "optimized_transducer": _optimized_transducer}  # module -> call maker


def _matching(forward, reference):
    """forward, checked once (on its first call) to give reference's loss to 1e-3 relative: a peer
    computing another loss fails its row instead of being timed."""
    checked = []

    def call():
        if not checked:
            with torch.no_grad():
                got, want = float(forward()), float(reference())
            if not math.isclose(got, want, rel_tol=1e-3):
                raise ValueError(f"loss {got:.6g} is not torchaudio's {want:.6g}; not timed")
            checked.append(True)
        return forward()

    return call


def peer_candidates(args, wrap, reference):
    """An "other" candidate per installed peer; (name, why) for each one that is not installed."""
    others, skipped = [], []
    for name, make in PEERS.items():
        try:
            module = importlib.import_module(name)
        except ImportError:
            skipped.append((name, "not installed: make peers"))
            continue
        note = f"version {getattr(module, '__version__', '?')}"
        others.append(Candidate(name, wrap(_matching(make(module, *args), reference)), "other", note))
    return others, skipped


def loss_cases(device: torch.device, quick: bool, wanted=everything):
    grid = LOSS_QUICK if quick else LOSS_FULL
    for batch, frames, labels, vocab in grid["shapes"]:
        for dtype in grid["dtypes"]:
            name = f"B={batch} T={frames} U={labels} V={vocab} {DTYPE_NAMES[dtype]}"
            if not wanted(name):
                continue
            for mode in grid["modes"]:
                train = mode == "fwd+bwd"
                wrap = backward_of if train else inference
                logits = torch.randn(batch, frames, labels + 1, vocab, device=device, dtype=dtype,
                                     requires_grad=train)
                args = (logits, *_labels(batch, frames, labels, vocab, device))
                baseline = Candidate("torchaudio rnnt_loss", wrap(lambda: TAF.rnnt_loss(*args, blank=0)), "baseline")
                faces, skipped = face_candidates("rnnt_loss", device, wrap(lambda: ak.rnnt_loss(*args, blank=0)),
                                                 _reference_note(logits.numel()))
                if dtype == torch.float32 and device.type == "cpu":
                    peers, absent = peer_candidates(args, wrap, lambda: TAF.rnnt_loss(*args, blank=0))
                else:  # what `make peers` builds: CPU, and both run fp32 only there
                    peers, absent = [], [(name, "timed for fp32 on the CPU only") for name in PEERS]
                params = dict(batch=batch, frames=frames, labels=labels, vocab=vocab, dtype=DTYPE_NAMES[dtype])
                yield Case("rnnt_loss", name, mode, params, baseline, faces + peers, skipped + absent)


def joint_cases(device: torch.device, quick: bool, wanted=everything):
    grid = JOINT_QUICK if quick else JOINT_FULL
    for batch, frames, labels, hidden, vocab in grid["shapes"]:
        for dtype in grid["dtypes"]:
            name = f"B={batch} T={frames} U={labels} H={hidden} V={vocab} {DTYPE_NAMES[dtype]}"
            if not wanted(name):
                continue
            for mode in grid["modes"]:
                train = mode == "fwd+bwd"
                wrap = backward_of if train else inference

                def leaf(*shape, scale=1.0):
                    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(train)

                enc, pred = leaf(batch, frames, hidden), leaf(batch, labels + 1, hidden)
                weight, bias = leaf(vocab, hidden, scale=hidden ** -0.5), leaf(vocab)
                labels_ = _labels(batch, frames, labels, vocab, device)

                def joint():
                    return torch.tanh(enc[:, :, None] + pred[:, None]) @ weight.T + bias

                baseline = Candidate("PyTorch joint + torchaudio", wrap(lambda: TAF.rnnt_loss(joint(), *labels_, blank=0)),
                                     "baseline", "materialises (B, T, U+1, V) logits and their gradient")
                loss_face = ak.which_face("rnnt_loss", device)  # our fastest rnnt_loss here

                def joint_then_loss(face=loss_face):
                    with ak.use_backend(face):
                        return ak.rnnt_loss(joint(), *labels_, blank=0)

                others = [Candidate(f"PyTorch joint + amnets rnnt_loss[{loss_face}]", wrap(joint_then_loss), "other")]
                faces, skipped = face_candidates(
                    "fused_joint_rnnt_loss", device,
                    wrap(lambda: ak.fused_joint_rnnt_loss(enc, pred, weight, bias, *labels_, blank=0)),
                    _reference_note(batch * frames * (labels + 1) * vocab))
                params = dict(batch=batch, frames=frames, labels=labels, hidden=hidden, vocab=vocab,
                              dtype=DTYPE_NAMES[dtype])
                yield Case("fused_joint_rnnt_loss", name, mode, params, baseline, others + faces, skipped)


def loss_headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline rnnt_loss shape."""
    return (params["batch"], params["frames"], params["labels"], params["vocab"], params["dtype"]) == \
        (16, 100, 30, 512, "fp32")


def joint_headline(params: dict, mode: str) -> bool:
    return params["dtype"] == "fp32" and params["hidden"] == 320
