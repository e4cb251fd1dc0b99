"""swap_in on an ordinary LSTM acoustic model: CPU inference of one utterance,
dense (nn.LSTM + nn.Linear) against the same model after swap_in(lstm_rank=256, linear_sparsity=0.75);
and a bidirectional 2-layer LSTM (what offline encoders use) against its LowRankLSTM / BlockSparseLSTM."""

import copy

import torch
from torch import nn

import amnets_kernels as ak

from .harness import Candidate, Case, everything, inference

FULL = dict(hidden=1024, layers=2, feat_dim=80, joint=512, vocab=1024, frames=100)
QUICK = dict(hidden=128, layers=2, feat_dim=40, joint=64, vocab=64, frames=20)


class AcousticModel(nn.Module):
    """Encoder LSTM stack and the joint's layers applied to every frame: what streaming inference of
    mostly-blank frames costs in an RNN-T."""

    def __init__(self, feat_dim, hidden, layers, joint, vocab):
        super().__init__()
        self.encoder = nn.LSTM(feat_dim, hidden, num_layers=layers)
        self.enc_proj = nn.Linear(hidden, joint)
        self.out = nn.Linear(joint, vocab)

    def forward(self, feats):
        return self.out(torch.tanh(self.enc_proj(self.encoder(feats)[0])))


def cases(device: torch.device, quick: bool, wanted=everything):
    g = QUICK if quick else FULL
    rank, sparsity, block = (256, 0.75, 32) if not quick else (32, 0.75, 16)
    name = (f"LSTM {g['layers']}x{g['hidden']} + joint {g['hidden']}->{g['joint']}->{g['vocab']}, "
            f"T={g['frames']} B=1; rank {rank}, sparsity {sparsity}, b={block}")
    if wanted(name):
        torch.manual_seed(0)
        dense = AcousticModel(g["feat_dim"], g["hidden"], g["layers"], g["joint"], g["vocab"]).to(device).eval()
        swapped = ak.swap_in(copy.deepcopy(dense), lstm_rank=rank, linear_sparsity=sparsity, block_size=block).eval()
        feats = torch.randn(g["frames"], 1, g["feat_dim"], device=device)
        faces = ", ".join(f"{op}={ak.which_face(op, device)}" for op in ("lowrank_lstm_sequence", "bsr_linear"))
        yield Case("swap_in", name, "fwd", dict(g, rank=rank, sparsity=sparsity, block=block),
                   Candidate("dense model", inference(lambda: dense(feats)), "baseline"),
                   [Candidate("after swap_in", inference(lambda: swapped(feats)), "face", f"faces: {faces}")])
    hidden, rank, block, frames = BIDIRECTIONAL[bool(quick)]
    if wanted(bidirectional_name(hidden, rank, block, frames)):
        yield bidirectional_case(device, quick)


BIDIRECTIONAL = {False: (512, 128, 32, 100), True: (128, 32, 16, 20)}  # hidden, rank, block, frames (by --quick)


def bidirectional_name(hidden, rank, block, frames) -> str:
    return f"bidirectional LSTM 2x{hidden}, T={frames} B=1; rank {rank} / sparsity 0.75 b={block}"


def bidirectional_case(device: torch.device, quick: bool) -> Case:
    hidden, rank, block, frames = BIDIRECTIONAL[bool(quick)]
    torch.manual_seed(0)
    lstm = nn.LSTM(hidden, hidden, num_layers=2, bidirectional=True).to(device).eval()
    low = ak.nn.LowRankLSTM.from_lstm(lstm, rank).eval()
    sparse = ak.nn.BlockSparseLSTM.from_lstm(lstm, 0.75, block).eval()
    feats = torch.randn(frames, 1, hidden, device=device)
    return Case("swap_in", bidirectional_name(hidden, rank, block, frames), "fwd",
                dict(hidden=hidden, layers=2, bidirectional=True, rank=rank, frames=frames),
                Candidate("nn.LSTM", inference(lambda: lstm(feats)), "baseline"),
                [Candidate(f"LowRankLSTM r={rank}", inference(lambda: low(feats)), "face",
                           f"face: {ak.which_face('lowrank_lstm_sequence', device)}"),
                 Candidate("BlockSparseLSTM 0.75", inference(lambda: sparse(feats)), "face",
                           f"face: {ak.which_face('bsr_linear', device)}; one native call per direction")])


def headline(params: dict, mode: str) -> bool:
    return params["hidden"] in (1024, 512)
