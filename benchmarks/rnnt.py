"""rnnt_loss against torchaudio's rnnt_loss, and fused_joint_rnnt_loss against materialising the
joint in PyTorch (then torchaudio, or our rnnt_loss). Headline shapes below."""

import torch
import torchaudio.functional as TAF

import amnets_kernels as ak

from .harness import DTYPE_NAMES, Candidate, Case, backward_of, face_candidates, inference

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


def loss_cases(device: torch.device, quick: bool):
    grid = LOSS_QUICK if quick else LOSS_FULL
    for batch, frames, labels, vocab in grid["shapes"]:
        for dtype in grid["dtypes"]:
            for mode in grid["modes"]:
                train = mode == "fwd+bwd"
                wrap = backward_of if train else inference
                logits = torch.randn(batch, frames, labels + 1, vocab, device=device, dtype=dtype,
                                     requires_grad=train)
                args = (logits, *_labels(batch, frames, labels, vocab, device))
                baseline = Candidate("torchaudio rnnt_loss", wrap(lambda: TAF.rnnt_loss(*args, blank=0)), "baseline")
                faces, skipped = face_candidates("rnnt_loss", device, wrap(lambda: ak.rnnt_loss(*args, blank=0)),
                                                 _reference_note(logits.numel()))
                name = f"B={batch} T={frames} U={labels} V={vocab} {DTYPE_NAMES[dtype]}"
                params = dict(batch=batch, frames=frames, labels=labels, vocab=vocab, dtype=DTYPE_NAMES[dtype])
                yield Case("rnnt_loss", name, mode, params, baseline, faces, skipped)


def joint_cases(device: torch.device, quick: bool):
    grid = JOINT_QUICK if quick else JOINT_FULL
    for batch, frames, labels, hidden, vocab in grid["shapes"]:
        for dtype in grid["dtypes"]:
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
                name = f"B={batch} T={frames} U={labels} H={hidden} V={vocab} {DTYPE_NAMES[dtype]}"
                params = dict(batch=batch, frames=frames, labels=labels, hidden=hidden, vocab=vocab,
                              dtype=DTYPE_NAMES[dtype])
                yield Case("fused_joint_rnnt_loss", name, mode, params, baseline, others + faces, skipped)


def loss_headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline rnnt_loss shape."""
    return (params["batch"], params["frames"], params["labels"], params["vocab"], params["dtype"]) == \
        (16, 100, 30, 512, "fp32")


def joint_headline(params: dict, mode: str) -> bool:
    return params["dtype"] == "fp32" and params["hidden"] == 320
