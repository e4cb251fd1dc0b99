"""python -m benchmarks.cuda_smoke: every op's cuda face once, forward and backward, at small ragged
shapes (dims off the block and tile multiples). Meant to run under compute-sanitizer (gpu_suite.sh does,
with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that an out-of-bounds access leaves its allocation)."""

import sys

import torch

import amnets_kernels as ak

from .harness import command_line

OPS = ("bsr_linear", "lowrank_lstm_sequence", "rnnt_loss", "fused_joint_rnnt_loss")


def main(argv=None) -> int:
    command_line(__doc__, "benchmarks.cuda_smoke").parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.cuda_smoke: no CUDA GPU here (torch.cuda.is_available() is False); nothing run",
              file=sys.stderr)
        return 1
    missing = [f"{op}: {why}" for op in OPS if (why := ak.unavailable_reason(op, "cuda", "cuda")) is not None]
    if missing:
        print(f"benchmarks.cuda_smoke: no cuda face to run ({'; '.join(missing)}); nothing run", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=dev).to(dtype).requires_grad_(True)

    with ak.use_backend("cuda"):
        for block, m, dtype in ((32, 3, torch.float32), (16, 40, torch.bfloat16), (64, 17, torch.float16),
                                (4, 5, torch.float32)):
            w = ak.BlockSparseMatrix.from_dense(torch.randn(150, 70), block_size=block, sparsity=0.5)
            w = w.to(device=dev, dtype=dtype)
            w.values.requires_grad_(True)
            y = ak.bsr_linear(leaf(m, 70, dtype=dtype), w, leaf(150, dtype=dtype))
            y.float().sum().backward()
        for steps, batch, hidden, rank_hh in ((5, 3, 37, 7), (3, 20, 70, 64), (2, 2, 300, 100)):
            x = leaf(steps, batch, 9)
            w = [leaf(4 * hidden, 6), leaf(6, 9), leaf(4 * hidden, rank_hh), leaf(rank_hh, hidden), leaf(4 * hidden)]
            out, h, c = ak.lowrank_lstm_sequence(x, leaf(batch, hidden), leaf(batch, hidden), *w)
            (out.sum() + h.sum() + c.sum()).backward()
        for batch, frames, labels, vocab in ((3, 7, 4, 37), (2, 40, 9, 300)):
            logits = leaf(batch, frames, labels + 1, vocab)
            targets = torch.randint(1, vocab, (batch, labels), device=dev, dtype=torch.int32)
            lengths = torch.tensor([frames] + [max(1, frames - 2)] * (batch - 1), device=dev, dtype=torch.int32)
            t_lengths = torch.tensor([labels] + [max(0, labels - 1)] * (batch - 1), device=dev, dtype=torch.int32)
            ak.rnnt_loss(logits, targets, lengths, t_lengths, blank=0).backward()
            enc, pred = leaf(batch, frames, 24), leaf(batch, labels + 1, 24)
            ak.fused_joint_rnnt_loss(enc, pred, leaf(vocab, 24), leaf(vocab), targets, lengths, t_lengths,
                                     blank=0).backward()
    torch.cuda.synchronize()
    print("cuda_smoke: every cuda face ran forward and backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
