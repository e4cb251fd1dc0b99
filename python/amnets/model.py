"""AmNetsRNNT: frame stacking + AmNetsEncoder + prediction network + joint, trained with the fused
joint RNN-T loss of amnets_kernels plus a compute-cost penalty.

Token 0 is the blank and also the prediction network's start symbol; labels are 1..vocab_size-1.
The joint is tanh(enc_proj(enc) + pred_proj(pred)) @ out.weight.T + out.bias, exactly what
amnets_kernels.fused_joint_rnnt_loss computes without materialising the (B, T, U+1, V) logits.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import amnets_kernels as ak

from .decode import beam_search, count
from .encoder import AmNetsEncoder, _input_dtypes, _is_index, _is_int

STACK_TAILS = ("pad", "drop")
JOINT_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda t: t}


def within(lengths: Tensor, T: int, device) -> Tensor:
    """(B, T) bool on device: position t of row b lies within lengths[b]."""
    return torch.arange(T, device=device)[None] < lengths.to(device)[:, None]


def stack_frames(feats: Tensor, lengths: Tensor, stack: int, tail: str = "pad") -> tuple[Tensor, Tensor]:
    """Concatenate `stack` consecutive frames with stride `stack`: (B, T, F) -> (B, T', stack * F).

    tail="pad": a last partial group is zero-padded (T' = ceil(T / stack), no audio is lost);
    tail="drop": it is dropped (T' = floor(T / stack)). Lengths follow the same rounding. Frames past a row's
    length are read as zeros whatever the batch holds there, so each row stacks as it would alone.
    """
    _check_stack("stack_frames", feats, lengths, stack, tail)
    B, T, n = feats.shape
    # A shorter row's last partial group would otherwise take the batch's padding past its length, and
    # padding's NaN or inf would reach the encoder's statistics and the loss (masking later keeps NaN * 0).
    feats = feats.masked_fill(~within(lengths, T, feats.device)[..., None], 0)
    if tail == "pad":
        frames, lengths = -(-T // stack), torch.div(lengths + stack - 1, stack, rounding_mode="floor")
        feats = F.pad(feats, (0, 0, 0, frames * stack - T))
    else:
        frames, lengths = T // stack, torch.div(lengths, stack, rounding_mode="floor")
        feats = feats[:, :frames * stack]
    return feats.reshape(B, frames, stack * n), lengths


class AmNetsRNNT(nn.Module):
    """An RNN-T whose encoder is an AmNetsEncoder.

    Args:
        input_size: feature dim per 10 ms frame (80 log-mel); the encoder sees stack * input_size.
        vocab_size: output classes including the blank 0.
        hidden_size, num_layers, cheap: the encoder's; further encoder knobs go in **encoder_kwargs
            (device and dtype, as for torch modules, apply to every part of the model).
        stack: frames stacked (and the stride); stack_tail: "pad" or "drop" the last partial group.
        pred_hidden: prediction LSTM width (default hidden_size); pred_embed: its embedding width
            (default pred_hidden); joint_hidden: width of the joint (default hidden_size).
        joint_activation: "tanh", "relu" or "identity" (the fused loss op's choices).
    """

    def __init__(self, input_size: int, vocab_size: int, hidden_size: int, num_layers: int,
                 cheap: str = "sparse", stack: int = 3, stack_tail: str = "pad",
                 pred_hidden: int | None = None, pred_embed: int | None = None,
                 joint_hidden: int | None = None, joint_activation: str = "tanh", **encoder_kwargs):
        super().__init__()
        factory = dict(device=encoder_kwargs.pop("device", None), dtype=encoder_kwargs.pop("dtype", None))
        if not _is_int(hidden_size) or hidden_size < 1:  # before the widths that default to it name it wrongly
            raise ValueError(f"AmNetsRNNT: hidden_size must be an int >= 1; got {hidden_size!r}")
        pred_hidden = hidden_size if pred_hidden is None else pred_hidden
        pred_embed = pred_hidden if pred_embed is None else pred_embed
        joint_hidden = hidden_size if joint_hidden is None else joint_hidden
        _check_init(input_size, vocab_size, stack, stack_tail, pred_hidden, pred_embed, joint_hidden,
                    joint_activation)
        self.input_size, self.vocab_size = input_size, vocab_size
        self.stack, self.stack_tail, self.joint_activation = stack, stack_tail, joint_activation
        self.encoder = AmNetsEncoder(stack * input_size, hidden_size, num_layers, cheap=cheap,
                                     **encoder_kwargs, **factory)
        self.embedding = nn.Embedding(vocab_size, pred_embed, **factory)
        self.prediction = nn.LSTM(pred_embed, pred_hidden, batch_first=True, **factory)
        self.enc_proj = nn.Linear(hidden_size, joint_hidden, **factory)
        # no bias: enc_proj's covers it
        self.pred_proj = nn.Linear(pred_hidden, joint_hidden, bias=False, **factory)
        self.out = nn.Linear(joint_hidden, vocab_size, **factory)

    def joint(self, enc_p: Tensor, pred_p: Tensor) -> Tensor:
        """Logits from projected encoder and prediction vectors (broadcasting): the fused op's joint."""
        act = JOINT_ACTIVATIONS[self.joint_activation]
        return F.linear(act(enc_p + pred_p), self.out.weight, self.out.bias)

    def predict(self, tokens: Tensor, state=None) -> tuple[Tensor, tuple]:
        """Prediction network on tokens (B, U) -> projected outputs (B, U, joint_hidden), LSTM state."""
        out, state = self.prediction(self.embedding(tokens), state)
        return self.pred_proj(out), state

    def loss(self, feats: Tensor, feat_lens: Tensor, targets: Tensor, target_lens: Tensor,
             cost_weight: float = 0.0, budget: float | None = None) -> tuple[Tensor, dict]:
        """RNN-T loss (mean over utterances of the per-utterance negative log-likelihood) plus
        cost_weight * cost_fraction, or with a budget cost_weight * relu(cost_fraction - budget).

        feats (B, T, input_size), feat_lens (B,), targets (B, U) with labels in 1..vocab_size-1 at the
        first target_lens[b] positions (padding is ignored), target_lens (B,) >= 1.
        stats: floats "rnnt", "penalty", "loss", "p_full" (mean over valid encoder frames),
        "full_fraction" (share of frames whose decision is full) and "cost_fraction".
        """
        _check_loss(self, feats, feat_lens, targets, target_lens, cost_weight, budget)
        x, enc_lens = stack_frames(feats, feat_lens, self.stack, self.stack_tail)
        enc, aux = self.encoder(x, enc_lens)
        valid = within(target_lens, targets.shape[1], targets.device)
        targets = targets.masked_fill(~valid, 1).long()
        pred_p, _ = self.predict(F.pad(targets, (1, 0), value=0))  # blank 0 starts every prediction
        rnnt = ak.fused_joint_rnnt_loss(self.enc_proj(enc), pred_p, self.out.weight, self.out.bias, targets,
                                        enc_lens.to(torch.int32), target_lens.to(torch.int32), blank=0,
                                        activation=self.joint_activation, reduction="mean")
        cost = aux["cost_fraction"]
        penalty = float(cost_weight) * (cost if budget is None else F.relu(cost - float(budget)))
        loss = rnnt + penalty
        mask = aux["mask"]
        p_full = aux["p_full"].reshape(*mask.shape, -1)
        decisions = aux["decisions"].reshape(*mask.shape, -1)
        frames = mask.sum().clamp(min=1) * p_full.shape[-1]
        stats = dict(rnnt=rnnt.item(), penalty=penalty.detach().item(), loss=loss.item(),
                     cost_fraction=cost.item(),
                     p_full=(p_full.sum() / frames).item(),
                     full_fraction=(decisions.sum() / frames).item())
        return loss, stats

    def forward(self, feats: Tensor, feat_lens: Tensor, targets: Tensor, target_lens: Tensor,
                cost_weight: float = 0.0, budget: float | None = None) -> tuple[Tensor, dict]:
        """The training loss, as loss(): forward() is what DistributedDataParallel wraps."""
        return self.loss(feats, feat_lens, targets, target_lens, cost_weight, budget)

    @torch.no_grad()
    def greedy_decode(self, feats: Tensor, feat_lens: Tensor, max_symbols_per_frame: int = 5,
                      return_decisions: bool = False):
        """Offline greedy RNN-T decoding: per encoder frame, emit the argmax label and stay on the frame
        until the blank wins or max_symbols_per_frame labels were emitted there. The encoder runs through
        stream() (the kernels, arbitrator decisions at its threshold). Returns one list of labels per
        utterance (never the blank); with return_decisions also the encoder's decisions, (B, T') or
        (B, T', L) bool, False past each utterance's encoder length, and the encoder lengths (B,)."""
        _check_decode("AmNetsRNNT.greedy_decode", self, feats, feat_lens, max_symbols_per_frame)
        enc_p, decisions, enc_lens = self._encode(feats, feat_lens, "AmNetsRNNT.greedy_decode")
        hyps = []
        for b in range(enc_p.shape[0]):
            hyp, token = [], feats.new_zeros(1, 1, dtype=torch.long)
            pred_p, state = self.predict(token)
            for t in range(int(enc_lens[b])):
                for _ in range(max_symbols_per_frame):
                    label = int(self.joint(enc_p[b, t], pred_p[0, 0]).argmax())
                    if label == 0:
                        break
                    hyp.append(label)
                    pred_p, state = self.predict(token.fill_(label), state)
            hyps.append(hyp)
        return (hyps, decisions, enc_lens) if return_decisions else hyps

    @torch.no_grad()
    def beam_decode(self, feats: Tensor, feat_lens: Tensor, beam: int = 4, max_symbols_per_frame: int = 5,
                    return_decisions: bool = False):
        """Offline RNN-T beam search (amnets.decode.beam_search: time-synchronous, at most
        max_symbols_per_frame labels per frame; beam=1 is greedy_decode up to rounding ties). Returns the best
        hypothesis per utterance, and with return_decisions the same extras as greedy_decode."""
        _check_decode("AmNetsRNNT.beam_decode", self, feats, feat_lens, max_symbols_per_frame)
        beam = count("AmNetsRNNT.beam_decode", "beam", beam)
        enc_p, decisions, enc_lens = self._encode(feats, feat_lens, "AmNetsRNNT.beam_decode")
        hyps = [beam_search(self, enc_p[b, :int(enc_lens[b])], beam, max_symbols_per_frame)[0][0]
                for b in range(enc_p.shape[0])]
        return (hyps, decisions, enc_lens) if return_decisions else hyps

    def _encode(self, feats: Tensor, feat_lens: Tensor, op: str = "AmNetsRNNT.decode") -> tuple[Tensor, Tensor, Tensor]:
        """Decoding's encoder pass: projected encoder output (B, T', joint_hidden), the decisions masked
        past each utterance's encoder length, the encoder lengths. Refuses (naming op) a model whose weights
        or logits are not finite."""
        _check_finite_weights(op, self)
        x, enc_lens = stack_frames(feats, feat_lens, self.stack, self.stack_tail)
        enc, _, decisions = self.encoder.stream(x)
        valid = within(enc_lens, x.shape[1], x.device)
        decisions = decisions & valid.reshape(*valid.shape, *[1] * (decisions.dim() - 2))
        enc_p = self.enc_proj(enc)  # causal: padding cannot reach valid frames
        _check_finite_logits(op, self, enc_p, valid)
        return enc_p, decisions, enc_lens


# ---------------------------------------------------------------------------------------------------
# validation: one function per public entry point


def _check_init(input_size, vocab_size, stack, stack_tail, pred_hidden, pred_embed, joint_hidden,
                joint_activation):
    op = "AmNetsRNNT"
    for name, value, low in (("input_size", input_size, 1), ("vocab_size", vocab_size, 2),
                             ("stack", stack, 1), ("pred_hidden", pred_hidden, 1),
                             ("pred_embed", pred_embed, 1), ("joint_hidden", joint_hidden, 1)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}; got {value!r}")
    if stack_tail not in STACK_TAILS:
        raise ValueError(f"{op}: stack_tail must be one of {STACK_TAILS}; got {stack_tail!r}")
    if joint_activation not in JOINT_ACTIVATIONS:
        raise ValueError(f"{op}: joint_activation must be one of {tuple(JOINT_ACTIVATIONS)}; "
                         f"got {joint_activation!r}")


def _check_stack(op: str, feats, lengths, stack, tail) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 3:
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"{op}: feats must be a (B, T, F) tensor; got {got}")
    if not _is_index(lengths) or tuple(lengths.shape) != (feats.shape[0],):
        raise ValueError(f"{op}: lengths must be an integer tensor of shape ({feats.shape[0]},)")
    T = feats.shape[1]
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"{op}: lengths must lie in [0, T={T}]; got {lengths.tolist()}")
    if not _is_int(stack) or stack < 1:
        raise ValueError(f"{op}: stack must be an int >= 1; got {stack!r}")
    if tail not in STACK_TAILS:
        raise ValueError(f"{op}: tail must be one of {STACK_TAILS}; got {tail!r}")


def _check_features(op: str, model: AmNetsRNNT, feats, feat_lens) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 3 or feats.shape[2] != model.input_size:
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"{op}: feats must have shape (B, T, input_size={model.input_size}); got {got}")
    weights = model.out.weight
    allowed = _input_dtypes(feats.device.type, weights.dtype)  # under autocast the products cast as it says
    if feats.device != weights.device or feats.dtype not in allowed:
        also = sorted(str(d) for d in allowed - {weights.dtype})
        raise ValueError(f"{op}: feats are {feats.dtype} on {feats.device} but the model's weights are "
                         f"{weights.dtype} on {weights.device}"
                         + (f" (under torch.autocast feats may also be {' or '.join(also)})" if also else "")
                         + f"; pass feats.to({weights.dtype}) on that device "
                         "(or convert the model with .to(); under torch.autocast the weights stay fp32)")
    B, T, _ = feats.shape
    if not _is_index(feat_lens) or tuple(feat_lens.shape) != (B,):
        raise ValueError(f"{op}: feat_lens must be an integer tensor of shape ({B},)")
    shortest = model.stack if model.stack_tail == "drop" else 1  # at least one encoder frame
    if B and (int(feat_lens.min()) < shortest or int(feat_lens.max()) > T):
        raise ValueError(f"{op}: feat_lens must lie in [{shortest}, T={T}]; got {feat_lens.tolist()}")


def _check_loss(model: AmNetsRNNT, feats, feat_lens, targets, target_lens, cost_weight, budget) -> None:
    op = "AmNetsRNNT.loss"
    _check_features(op, model, feats, feat_lens)
    B = feats.shape[0]
    if B == 0:
        raise ValueError(f"{op}: feats hold no utterance (B = 0); the loss is a mean over at least one")
    if not _is_index(targets) or targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"{op}: targets must be an integer tensor of shape (B={B}, U)")
    if targets.shape[1] == 0:
        raise ValueError(f"{op}: targets are empty (U = 0); every utterance needs at least one label")
    if not _is_index(target_lens) or tuple(target_lens.shape) != (B,):
        raise ValueError(f"{op}: target_lens must be an integer tensor of shape ({B},)")
    if int(target_lens.min()) < 1 or int(target_lens.max()) > targets.shape[1]:
        raise ValueError(f"{op}: target_lens must lie in [1, U={targets.shape[1]}] (empty targets are not "
                         f"supported); got {target_lens.tolist()}")
    labels = targets[within(target_lens, targets.shape[1], targets.device)]
    if int(labels.min()) < 1 or int(labels.max()) >= model.vocab_size:
        raise ValueError(f"{op}: target labels must lie in [1, vocab_size-1={model.vocab_size - 1}] "
                         f"(0 is the blank); got values in [{int(labels.min())}, {int(labels.max())}]")
    # Real numbers of any kind (NumPy's too; the loss takes their float), never a bool or a tensor.
    if isinstance(cost_weight, bool) or not isinstance(cost_weight, numbers.Real) \
            or not 0 <= cost_weight < math.inf:  # NaN fails too
        raise ValueError(f"{op}: cost_weight must be a finite number >= 0 (a Python or NumPy real; for a 0-dim "
                         f"tensor t, pass float(t)); got {cost_weight!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                               or not 0.0 <= budget <= 1.0):
        raise ValueError(f"{op}: budget must be None or a cost fraction in [0, 1]; got {budget!r}")


def _check_decode(op: str, model: AmNetsRNNT, feats, feat_lens, max_symbols_per_frame) -> None:
    _check_features(op, model, feats, feat_lens)
    count(op, "max_symbols_per_frame", max_symbols_per_frame)
    # A NaN frame decoded to ordinary-looking labels (argmax over NaN logits); frames past a length are not read.
    bad = (~torch.isfinite(feats)).any(-1) & within(feat_lens, feats.shape[1], feats.device)
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()
        raise ValueError(f"{op}: feats hold NaN or inf within the lengths of utterance(s) {rows[:5]}"
                         f"{' ...' if len(rows) > 5 else ''}")


def _check_finite_weights(op: str, model: AmNetsRNNT) -> None:
    """Decoding with a NaN or inf weight gives confident-looking nonsense (an all-NaN joint decodes to the
    blank: empty hypotheses), never an error: refused once per batch, naming the first bad tensors."""
    names, params = zip(*model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()  # one sync for all of them
    bad = [name for name, ok in zip(names, finite) if not ok]
    if bad:
        raise ValueError(f"{op}: the model's weights hold NaN or inf ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}); its hypotheses would be meaningless")


def _check_finite_logits(op: str, model: AmNetsRNNT, enc_p: Tensor, valid: Tensor) -> None:
    """Finite weights can still overflow: the projected encoder output of every valid frame, checked in one
    batched pass (not per label in the decoding loops; the joint's own overflow is left to the loss's checks)."""
    bad = ~torch.isfinite(enc_p).all(-1) & valid
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()
        raise ValueError(f"{op}: the model's encoder output is NaN or inf (an overflow) for utterance(s) "
                         f"{rows[:5]}{' ...' if len(rows) > 5 else ''}; its hypotheses would be meaningless")
