"""swap_in on one of torchaudio's models, as they ship (default configurations): what is replaced, what is
left as it is and why.

    python examples/swap_torchaudio.py tacotron2        # or: emformer_rnnt, conformer, deepspeech, wavernn
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torchaudio.models as M

import amnets_kernels as ak

MODELS = {
    "tacotron2": lambda: M.Tacotron2(),
    "emformer_rnnt": lambda: M.emformer_rnnt_base(num_symbols=4097),
    "conformer": lambda: M.Conformer(input_dim=80, num_heads=4, ffn_dim=1024, num_layers=16,
                                     depthwise_conv_kernel_size=31),
    "deepspeech": lambda: M.DeepSpeech(n_feature=80),
    "wavernn": lambda: M.WaveRNN(upsample_scales=[5, 5, 11], n_classes=256, hop_length=275),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--lstm-rank", type=float, default=64, help="int rank, or a fraction of energy (< 1)")
    parser.add_argument("--linear-sparsity", type=float, default=0.75)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = MODELS[args.model]()
    rank = int(args.lstm_rank) if args.lstm_rank >= 1 else args.lstm_rank
    start = time.perf_counter()
    try:
        _, report = ak.swap_in(model, lstm_rank=rank, linear_sparsity=args.linear_sparsity,
                               block_size=args.block_size, return_report=True)
    except ValueError as exc:  # an argument swap_in refuses: its message names it; one line, no traceback
        print(f"{parser.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"torchaudio.models {args.model}: swap_in(lstm_rank={rank}, linear_sparsity={args.linear_sparsity}, "
          f"block_size={args.block_size}) in {time.perf_counter() - start:.1f} s")
    print(report)
    return report


if __name__ == "__main__":
    main()
