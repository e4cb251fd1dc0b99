"""An ordinary LSTM RNN-Transducer built from torch modules, trained a little, then made faster with
one call: amnets_kernels.swap_in (low-rank LSTMs, a block-sparse joint layer, our RNN-T loss), then
fine-tuned. Prints speed and accuracy before and after.

    python examples/swap_rnnt.py          # a 1 x 512 LSTM encoder; under a minute on 2 cores
    python examples/swap_rnnt.py --hidden 1024 --layers 2 --steps 600 --finetune 100   # larger, slower

Success, as it prints it: the swapped, fine-tuned model's accuracy within --tolerance of the dense model's
(default 0.05) at a measured inference speed-up; its last line states both as measured (e.g. "accuracy kept
within 0.05 of the dense model's at a 2.63x speed-up: success", or "..., but slower than dense (0.61x)").

The task is synthetic and offline: every token of a random label sequence is rendered as a few frames
of its own noisy feature prototype, with blank-like silence between tokens; the model must transcribe.
Accuracy is the token accuracy of greedy decoding (1 - edit distance / length).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchaudio
from torch import nn

import amnets_kernels as ak
from amnets.cli import edit_distance  # installed with amnets_kernels


class LSTMTransducer(nn.Module):
    """Encoder LSTM, prediction network (embedding + LSTM), joint (two Linear layers), torchaudio loss."""

    def __init__(self, feat_dim: int, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.encoder = nn.LSTM(feat_dim, hidden, num_layers=layers)
        self.embed = nn.Embedding(vocab, hidden // 2)
        self.predictor = nn.LSTM(hidden // 2, hidden // 2)
        self.enc_proj = nn.Linear(hidden, hidden // 2)
        self.out = nn.Linear(hidden // 2, vocab)
        self.loss = torchaudio.transforms.RNNTLoss(blank=0, reduction="mean")

    def encode(self, feats):  # (T, B, F) -> (B, T, J)
        return self.enc_proj(self.encoder(feats)[0]).transpose(0, 1)

    def predict(self, labels, state=None):  # (B, U) -> (B, U, J)
        out, state = self.predictor(self.embed(labels).transpose(0, 1), state)
        return out.transpose(0, 1), state

    def joint(self, enc, pred):
        return self.out(torch.tanh(enc + pred))

    def forward(self, feats, labels, feat_lens, label_lens):
        blank_first = nn.functional.pad(labels, (1, 0))  # the prediction network starts from blank (0)
        enc, pred = self.encode(feats), self.predict(blank_first)[0]
        logits = self.joint(enc[:, :, None], pred[:, None])
        return self.loss(logits, labels.int(), feat_lens.int(), label_lens.int())

    @torch.no_grad()
    def greedy(self, feats, max_symbols: int = 4) -> list[int]:
        """Greedy RNN-T decoding of one utterance (T, 1, F)."""
        enc = self.encode(feats)[0]
        token = torch.zeros(1, 1, dtype=torch.long)
        pred, state = self.predict(token)
        hyp = []
        for t in range(enc.shape[0]):
            for _ in range(max_symbols):
                k = int(self.joint(enc[t], pred[0, 0]).argmax())
                if k == 0:
                    break
                hyp.append(k)
                pred, state = self.predict(torch.tensor([[k]]), state)
        return hyp


def synthetic_batch(batch, vocab, feat_dim, prototypes, gen, labels_per_utt=6, frames_per_token=4):
    labels = torch.randint(1, vocab, (batch, labels_per_utt), generator=gen)
    frames = []
    for b in range(batch):
        pieces = []
        for k in labels[b].tolist():
            pieces += [torch.zeros(2, feat_dim), prototypes[k].expand(frames_per_token, feat_dim)]
        pieces.append(torch.zeros(2, feat_dim))
        frames.append(torch.cat(pieces) + 0.3 * torch.randn(sum(p.shape[0] for p in pieces), feat_dim, generator=gen))
    feats = torch.stack(frames, dim=1)  # (T, B, F)
    return feats, labels, torch.full((batch,), feats.shape[0]), torch.full((batch,), labels_per_utt)


def accuracy(model, prototypes, args, gen, utterances=8):
    errors = total = 0
    for _ in range(utterances):
        feats, labels, *_ = synthetic_batch(1, args.vocab, args.feat_dim, prototypes, gen)
        ref = labels[0].tolist()
        errors += edit_distance(model.greedy(feats), ref)
        total += len(ref)
    return max(0.0, 1 - errors / total)


def train(model, prototypes, args, gen, steps):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(steps):
        loss = model(*synthetic_batch(args.batch, args.vocab, args.feat_dim, prototypes, gen))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def inference_ms(model, args, repeats=5):
    """Median time of the acoustic side of inference on one utterance of args.frames frames: encoder plus
    the joint's output layer on every frame (what greedy decoding of mostly-blank frames costs)."""
    feats = torch.randn(args.frames, 1, args.feat_dim)
    pred = torch.zeros(1, 1, model.out.in_features)

    def once():
        enc = model.encode(feats)
        return model.joint(enc, pred)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def verdict(kept: bool, speedup: float, tolerance: float) -> str:
    """Both facts success needs, each as measured: accuracy within `tolerance` of dense, and faster than dense."""
    accuracy = f"accuracy {'kept' if kept else 'NOT kept'} within {tolerance} of the dense model's"
    if speedup > 1:
        return f"{accuracy} at a {speedup:.2f}x speed-up: success" if kept else \
            f"{accuracy}, though at a {speedup:.2f}x speed-up"
    return f"{accuracy}, {'but' if kept else 'and'} slower than dense ({speedup:.2f}x)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--feat-dim", type=int, default=80)
    parser.add_argument("--vocab", type=int, default=12, help="tokens, blank (0) included")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="training steps of the dense model")
    parser.add_argument("--finetune", type=int, default=30, help="training steps after the swap")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=float, default=64, help="LSTM rank (int) or energy fraction (< 1)")
    parser.add_argument("--sparsity", type=float, default=0.75, help="block sparsity of the joint's Linear layers")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--min-macs", type=int, default=10_000,
                        help="layers with fewer MACs per frame stay dense (the vocabulary layer, by default)")
    parser.add_argument("--frames", type=int, default=100, help="utterance length for the timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.05, help="accuracy the swapped model may lose")
    args = parser.parse_args(argv)
    least = dict(hidden=2, layers=1, feat_dim=1, vocab=2, batch=1, steps=1, finetune=0, block_size=1, min_macs=0,
                 frames=1, threads=1)  # vocab: the blank and one token; hidden: the predictor gets hidden // 2
    for name, low in least.items():
        if getattr(args, name) < low:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= {low}; got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"argument --lr: must be > 0; got {args.lr}")
    if not args.rank > 0:
        parser.error(f"argument --rank: must be a rank >= 1 or an energy fraction in (0, 1); got {args.rank}")
    if not 0 <= args.sparsity <= 1:
        parser.error(f"argument --sparsity: must be in [0, 1]; got {args.sparsity}")
    if not args.tolerance >= 0:
        parser.error(f"argument --tolerance: must be >= 0; got {args.tolerance}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(args.vocab, args.feat_dim, generator=gen) * 1.5

    model = LSTMTransducer(args.feat_dim, args.vocab, args.hidden, args.layers)
    losses = train(model, prototypes, args, gen, args.steps)
    before = dict(loss=losses[-1], accuracy=accuracy(model, prototypes, args, gen), ms=inference_ms(model, args))

    rank = int(args.rank) if args.rank >= 1 else args.rank
    model, report = ak.swap_in(model, lstm_rank=rank, linear_sparsity=args.sparsity, block_size=args.block_size,
                               min_macs=args.min_macs, return_report=True)
    swapped = dict(accuracy=accuracy(model, prototypes, args, gen), ms=inference_ms(model, args))
    tuned_losses = train(model, prototypes, args, gen, args.finetune)
    after = dict(loss=tuned_losses[-1] if tuned_losses else float("nan"),
                 accuracy=accuracy(model, prototypes, args, gen), ms=inference_ms(model, args))
    faces = {op: ak.which_face(op) for op in ("lowrank_lstm_sequence", "bsr_linear", "rnnt_loss")}

    print(report)
    print(f"\nfaces: {faces}; {args.threads} threads; utterance of {args.frames} frames, batch 1")
    print(f"{'':24s} {'accuracy':>9s} {'inference ms':>13s}")
    print(f"{'dense (trained)':24s} {before['accuracy']:9.2f} {before['ms']:13.2f}")
    print(f"{'swapped, no fine-tune':24s} {swapped['accuracy']:9.2f} {swapped['ms']:13.2f}")
    print(f"{'swapped + fine-tuned':24s} {after['accuracy']:9.2f} {after['ms']:13.2f}")
    kept, speedup = after["accuracy"] >= before["accuracy"] - args.tolerance, before["ms"] / after["ms"]
    print(f"{verdict(kept, speedup, args.tolerance)}; {time.perf_counter() - started:.0f} s in all")
    return dict(before=before, swapped=swapped, after=after, first_loss=losses[0], report=report, faces=faces,
                accuracy_kept=kept, speedup=speedup, success=kept and speedup > 1)


if __name__ == "__main__":
    main()
