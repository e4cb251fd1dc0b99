"""RNN-T beam search for AmNetsRNNT (AmNetsRNNT.beam_decode calls it per utterance).

beam_search is a time-synchronous beam search after the time-synchronous decoding of Saon, Tüske and
Audhkhasi ("Alignment-length synchronous decoding for RNN transducer", ICASSP 2020; ESPnet's
`time_sync_decoding`): on each encoder frame, up to max_symbols rounds. In a round every hypothesis still on
the frame proposes the blank (which ends its frame) and its `beam` best labels (it stays on the frame).
Unlike ESPnet's, the frame's ended and staying hypotheses compete for the same `beam` places, so that beam=1
makes greedy decoding's choices (the blank winning ties, as argmax does; tests/test_amnets_cli_beam.py
checks it) except where two candidates differ by a rounding error: greedy compares raw logits, the beam
accumulated log-probabilities, in which a 1-ulp lead can round to a tie. Ended hypotheses with the same
labels are merged by log-add (the sum over their alignments, as icefall's modified_beam_search does). A
hypothesis still on the frame after max_symbols labels leaves it, as greedy decoding does at its cap; its
score takes the blank's log-probability there, so that every score is that of real alignments.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor


class _Hyp:
    __slots__ = ("labels", "score", "pred", "state")

    def __init__(self, labels: tuple, score: float, pred: Tensor | None = None, state=None):
        self.labels, self.score, self.pred, self.state = labels, score, pred, state


def _advance(model, parents: list[_Hyp], labels: list[int], scores: list[float]) -> list[_Hyp]:
    """The parents with one more label each: one batched step of the prediction network."""
    tokens = torch.tensor(labels, device=parents[0].pred.device)[:, None]
    state = tuple(torch.cat([p.state[i] for p in parents], dim=1) for i in range(2))
    pred, (h, c) = model.predict(tokens, state)
    return [_Hyp(p.labels + (k,), s, pred[i, 0], (h[:, i:i + 1], c[:, i:i + 1]))
            for i, (p, k, s) in enumerate(zip(parents, labels, scores))]


def _merge(into: dict, hyp: _Hyp) -> None:
    """Add an ended hypothesis; one with the same labels (another alignment of them) is log-added."""
    old = into.get(hyp.labels)
    if old is None:
        into[hyp.labels] = hyp
    else:
        high, low = max(old.score, hyp.score), min(old.score, hyp.score)
        old.score = high + math.log1p(math.exp(low - high))


def count(op: str, name: str, value) -> int:
    """A decoding count (beam, labels per frame): an int >= 1, numpy integers too (a config array's), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1; got {value!r}")
    return int(value)


@torch.no_grad()
def beam_search(model, enc_p: Tensor, beam: int = 4, max_symbols: int = 5) -> list[tuple[list[int], float]]:
    """The n-best (labels, log-score) of one utterance, best first, at most `beam` of them.

    model: an AmNetsRNNT (its predict() and joint()); enc_p: (T, joint_hidden), the projected encoder
    output of the utterance's valid frames (model.enc_proj of AmNetsEncoder.stream's output). The score
    is the log-probability of the hypothesis's surviving alignments (summed where merged).
    """
    beam, max_symbols = count("beam_search", "beam", beam), count("beam_search", "max_symbols", max_symbols)
    _check_enc_p("beam_search", model, enc_p, min_frames=0)
    start = torch.zeros(1, 1, dtype=torch.long, device=enc_p.device)  # blank 0 starts the prediction
    pred, state = model.predict(start)
    hyps = [_Hyp((), 0.0, pred[0, 0], state)]
    top = min(beam, model.vocab_size - 1)
    for t in range(enc_p.shape[0]):
        ended: dict[tuple, _Hyp] = {}
        for round_ in range(max_symbols + 1):
            logp = F.log_softmax(model.joint(enc_p[t], torch.stack([h.pred for h in hyps])), dim=-1)
            for h, blank in zip(hyps, logp[:, 0].tolist()):
                _merge(ended, _Hyp(h.labels, h.score + blank, h.pred, h.state))
            if round_ == max_symbols:  # at the cap: the frame ends (its blank scored) whatever wins
                break
            label_logp, label = logp[:, 1:].topk(top, dim=-1)
            staying = [(h.score + lp, 1, (i, k + 1)) for i, h in enumerate(hyps)
                       for lp, k in zip(label_logp[i].tolist(), label[i].tolist())]
            # Ended ones listed first and a stable sort: the blank wins ties, as greedy's argmax does.
            ranked = sorted([(h.score, 0, h) for h in ended.values()] + staying, key=lambda r: -r[0])[:beam]
            ended = {h.labels: h for _, kind, h in ranked if kind == 0}
            go = [(score, *payload) for score, kind, payload in ranked if kind == 1]
            if not go:
                break
            hyps = _advance(model, [hyps[i] for _, i, _ in go], [k for *_, k in go], [s for s, *_ in go])
        hyps = sorted(ended.values(), key=lambda h: -h.score)[:beam]
    return [(list(h.labels), h.score) for h in hyps]


@torch.no_grad()
def sequence_log_prob(model, enc_p: Tensor, labels: list[int]) -> float:
    """log P(labels | utterance) under the model: the RNN-T forward algorithm over every alignment (no cap
    on labels per frame), on the full (T, U+1, V) lattice. enc_p as for beam_search. For scoring a few
    hypotheses (tests, analysis): it builds the whole lattice."""
    _check_enc_p("sequence_log_prob", model, enc_p, min_frames=1)
    vocab = model.vocab_size
    if isinstance(labels, Tensor):
        labels = labels.tolist() if labels.dim() == 1 and not labels.is_floating_point() else labels
    if not isinstance(labels, (list, tuple)) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and 1 <= k < vocab for k in labels):
        raise ValueError(f"sequence_log_prob: labels must be a list of ints in [1, vocab_size-1={vocab - 1}] "
                         f"(0 is the blank); got {labels!r}")
    tokens = torch.tensor([[0] + [int(k) for k in labels]], device=enc_p.device)
    pred, _ = model.predict(tokens)
    logp = F.log_softmax(model.joint(enc_p[:, None], pred[0][None]), dim=-1)  # (T, U+1, V)
    T, U = enc_p.shape[0], len(labels)
    blank = logp[..., 0]
    emit = logp[:, :-1].gather(-1, tokens[0, 1:].view(1, U, 1).expand(T, U, 1))[..., 0] if U else None
    # alpha[u]: log-probability of having emitted labels[:u] by the current frame. Within a frame the
    # labels form a prefix scan: alpha[u] = logsumexp_v (a[v] + emit[v:u].sum()), a cumulative logsumexp.
    alpha = torch.full((U + 1,), -math.inf, dtype=logp.dtype, device=logp.device)
    alpha[0] = 0.0
    for t in range(T):
        if t:
            alpha = alpha + blank[t - 1]  # the previous frame ended with a blank
        if U:
            cum = F.pad(emit[t].cumsum(0), (1, 0))
            alpha = cum + torch.logcumsumexp(alpha - cum, 0)
    return float(alpha[U] + blank[T - 1, U])


def _check_enc_p(op: str, model, enc_p, min_frames: int) -> None:
    """enc_p: a finite (T >= min_frames, joint_hidden) tensor in the joint's dtype and device."""
    proj = model.enc_proj.weight
    width = proj.shape[0]
    if not isinstance(enc_p, Tensor) or enc_p.dim() != 2 or enc_p.shape[1] != width or enc_p.shape[0] < min_frames:
        got = tuple(enc_p.shape) if isinstance(enc_p, Tensor) else type(enc_p).__name__
        raise ValueError(f"{op}: enc_p must be a (T{' >= 1' if min_frames else ''}, joint_hidden={width}) tensor "
                         f"(model.enc_proj of one utterance's encoder output); got {got}")
    casts = torch.is_autocast_enabled(enc_p.device.type)  # then the joint's products cast as autocast says
    if (enc_p.dtype != proj.dtype and not casts) or enc_p.device != proj.device:
        raise ValueError(f"{op}: enc_p is {enc_p.dtype} on {enc_p.device} but the model's weights are {proj.dtype} "
                         f"on {proj.device}; pass enc_p.to(...) to match")
    if not bool(torch.isfinite(enc_p).all()):
        raise ValueError(f"{op}: enc_p holds NaN or inf (non-finite features or weights); its hypotheses would "
                         "be meaningless")
