"""swap_in on an ordinary LSTM acoustic model: CPU inference of one utterance,
dense (nn.LSTM + nn.Linear) against the same model after swap_in(lstm_rank=256, linear_sparsity=0.75);
a bidirectional 2-layer LSTM (what offline encoders use) and a projected one (nn.LSTM's proj_size, an LSTMP
encoder as on-device models use) against their LowRankLSTM / BlockSparseLSTM."""

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
    hidden, proj, rank, block, frames = PROJECTED[bool(quick)]
    if wanted(projected_name(hidden, proj, rank, block, frames)):
        yield projected_case(device, quick)


BIDIRECTIONAL = {False: (512, 128, 32, 100), True: (128, 32, 16, 20)}  # hidden, rank, block, frames (by --quick)
PROJECTED = {False: (1024, 256, 128, 32, 100), True: (128, 32, 16, 16, 20)}  # hidden, proj, rank, block, frames


def bidirectional_name(hidden, rank, block, frames) -> str:
    return f"bidirectional LSTM 2x{hidden}, T={frames} B=1; rank {rank} / sparsity 0.75 b={block}"


def projected_name(hidden, proj, rank, block, frames) -> str:
    return f"LSTMP 2x{hidden} proj {proj}, input 80, T={frames} B=1; rank {rank} / sparsity 0.75 b={block}"


def bidirectional_case(device: torch.device, quick: bool) -> Case:
    hidden, rank, block, frames = BIDIRECTIONAL[bool(quick)]
    torch.manual_seed(0)
    lstm = nn.LSTM(hidden, hidden, num_layers=2, bidirectional=True).to(device).eval()
    return _lstm_case(lstm, bidirectional_name(hidden, rank, block, frames), rank, block,
                      torch.randn(frames, 1, hidden, device=device), dict(bidirectional=True))


def projected_case(device: torch.device, quick: bool) -> Case:
    hidden, proj, rank, block, frames = PROJECTED[bool(quick)]
    torch.manual_seed(0)
    lstm = nn.LSTM(80, hidden, num_layers=2, proj_size=proj).to(device).eval()
    return _lstm_case(lstm, projected_name(hidden, proj, rank, block, frames), rank, block,
                      torch.randn(frames, 1, 80, device=device), dict(proj_size=proj))


def _lstm_case(lstm: nn.LSTM, name: str, rank: int, block: int, feats: torch.Tensor, params: dict) -> Case:
    """nn.LSTM against its LowRankLSTM (rank) and BlockSparseLSTM (sparsity 0.75, block), inference on feats."""
    device = feats.device
    low = ak.nn.LowRankLSTM.from_lstm(lstm, rank).eval()
    sparse = ak.nn.BlockSparseLSTM.from_lstm(lstm, 0.75, block).eval()
    return Case("swap_in", name, "fwd",
                dict(hidden=lstm.hidden_size, layers=2, rank=rank, frames=feats.shape[0], **params),
                Candidate("nn.LSTM", inference(lambda: lstm(feats)), "baseline"),
                [Candidate(f"LowRankLSTM r={rank}", inference(lambda: low(feats)), "face",
                           f"face: {ak.which_face('lowrank_lstm_sequence', device)}"),
                 Candidate("BlockSparseLSTM 0.75", inference(lambda: sparse(feats)), "face",
                           f"face: {ak.which_face('bsr_linear', device)}; one native call per direction")])


def headline(params: dict, mode: str) -> bool:
    return params["hidden"] in (1024, 512)
