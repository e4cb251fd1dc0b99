"""Export two models for a C++ program: torch.export, then AOTInductor to a .pt2 package each.

    python examples/deploy/export.py OUT_DIR

1. acoustic.pt2: a plain LSTM acoustic model (2 x LSTM 80 -> 256, Linear 256 -> 128 classes) whose layers
   `swap_in` replaces by LowRankLSTM (rank 64) and BlockSparseLinear (sparsity 0.5, b = 32).
2. amnets_step.pt2: one streamed frame (B = 1) of a low-rank AmNets encoder (40 -> 2 x 64, rank 16): the
   arbitrator decides, and torch.cond runs only the chosen branch of each layer (the dense LSTM update,
   or torch.ops.amnets.lowrank_lstm_cell); state in, state out, as AmNetsEncoder.stream carries it.
The exported programs call torch.ops.amnets.* (registered by our native library); AOTInductor compiles
the rest into the package, and its runtime calls our ops through the dispatcher. For each model OUT_DIR
also receives <name>.input.bin and <name>.expected.bin (raw float32: the input, and Python eager's
output for it). run_deployed (examples/deploy/run_deployed.cpp) loads a package with our library and
compares.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import amnets
import amnets_kernels as ak

FEATURES, HIDDEN, CLASSES, FRAMES = 80, 256, 128, 50


class AcousticModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True)
        self.output = nn.Linear(HIDDEN, CLASSES)

    def forward(self, features):
        hidden, _ = self.lstm(features)
        return self.output(hidden).log_softmax(-1)


class AmNetsStep(nn.Module):
    """One frame of a low-rank AmNetsEncoder at B = 1: (frame (1, D), h, c (L, 1, H)) -> (out (1, H), h, c,
    full (bool)). The same arithmetic as enc.stream(), as a graph: torch.cond picks each layer's branch."""

    def __init__(self, enc: amnets.AmNetsEncoder):
        super().__init__()
        assert enc.cheap == "lowrank" and not enc.per_layer_decisions
        self.enc = enc
        self.cut = float(torch.logit(torch.tensor(enc.threshold, dtype=torch.float64)))

    def forward(self, frame, h, c):
        enc = self.enc
        full = enc._p_logits(frame, h[-1])[0, 0] > self.cut
        inp, hs, cs = frame, [], []
        for k in range(enc.num_layers):
            # Every tensor a branch reads is an operand, and a fresh one: AOTInductor (torch 2.14) rejects
            # operands that are views of the graph's inputs ("might be aliasing the input"). Copies of
            # (1, H) cost nothing here.
            operands = (inp.clone(), h[k].clone(), c[k].clone(), enc.full_weight(k), getattr(enc, f"bias_l{k}"),
                        *enc.lowrank_weights(k))
            h1, c1 = torch.cond(full, _full_branch, _cheap_branch, operands)
            hs.append(h1)
            cs.append(c1)
            inp = h1
        return inp, torch.stack(hs), torch.stack(cs), full


def _full_branch(x, h, c, weight, bias, w_ih_u, w_ih_v, w_hh_u, w_hh_v):
    """The dense LSTM update: gates = [x | h] W^T + b, then nn.LSTM's pointwise step."""
    i, f, g, o = F.linear(torch.cat([x, h], 1), weight, bias).chunk(4, 1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c1), c1


def _cheap_branch(x, h, c, weight, bias, w_ih_u, w_ih_v, w_hh_u, w_hh_v):
    return torch.ops.amnets.lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)


def compile_package(out_dir: str, name: str, model: nn.Module, example: tuple):
    with torch.no_grad():
        program = torch.export.export(model, example)
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("amnets.")}
                 | {str(n.target) for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
                    for n in m.graph.nodes if str(n.target).startswith("amnets.")})
    print(f"{name}: exported; our ops in the graph: {', '.join(ops)}")
    return torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(out_dir, f"{name}.pt2"))


def write(out_dir: str, name: str, inputs: torch.Tensor, expected: torch.Tensor) -> None:
    inputs.contiguous().numpy().tofile(os.path.join(out_dir, f"{name}.input.bin"))
    expected.contiguous().numpy().tofile(os.path.join(out_dir, f"{name}.expected.bin"))


def acoustic(out_dir: str) -> None:
    torch.manual_seed(0)
    model = ak.swap_in(AcousticModel().eval(), lstm_rank=64, linear_sparsity=0.5, block_size=32)
    assert isinstance(model.lstm, ak.nn.LowRankLSTM) and isinstance(model.output, ak.nn.BlockSparseLinear)
    features = torch.randn(1, FRAMES, FEATURES)
    with torch.no_grad():
        expected = model(features)
    package = compile_package(out_dir, "acoustic", model, (features,))
    again = torch._inductor.aoti_load_package(package)(features)  # the package from Python: what C++ must match
    print(f"acoustic: Python AOTInductor run vs eager: max |diff| = {(again - expected).abs().max().item():.2e}")
    write(out_dir, "acoustic", features, expected)


def amnets_step(out_dir: str, frames: int = 30) -> None:
    torch.manual_seed(0)
    enc = amnets.AmNetsEncoder(40, 64, num_layers=2, cheap="lowrank", rank=16).eval()
    x = torch.randn(1, frames, 40)
    with torch.no_grad():  # an untrained arbitrator: a threshold between its middle two p_full splits the frames
        p = torch.sigmoid(enc._p_logits(x[0], torch.zeros(frames, 64)).double()).flatten().sort().values
        enc.threshold = float(p[frames // 2 - 1] + p[frames // 2]) / 2
    step = AmNetsStep(enc)
    with torch.no_grad():
        out, _, decisions = enc.stream(x)  # what a live stream computes
        h = c = torch.zeros(2, 1, 64)
        mine = []
        for t in range(frames):
            y, h, c, full = step(x[:, t], h, c)
            mine.append(y)
            assert bool(full) == bool(decisions[0, t]), "the step's decision differs from stream()'s"
        diff = (torch.stack(mine, 1) - out).abs().max().item()
    print(f"amnets_step: {int(decisions.sum())} of {frames} frames on the full branch; step vs stream(): "
          f"max |diff| = {diff:.2e}")
    assert diff < 1e-5
    # h and c as two tensors: one tensor passed for both would be exported as one input read twice.
    # An example frame with row-major strides (40, 1): x[:, 0] has (1200, 1), which the package (run with
    # AOTI_RUNTIME_CHECK_INPUTS=1 by run_deployed) would then demand of every frame. Not .contiguous(): a
    # (1, 40) view counts as contiguous whatever its first stride, so it returns the view as it is.
    frame = x[:, 0].clone(memory_format=torch.contiguous_format)
    compile_package(out_dir, "amnets_step", step, (frame, torch.zeros(2, 1, 64), torch.zeros(2, 1, 64)))
    write(out_dir, "amnets_step", x[0], out[0])  # (T, D) frames in, (T, H) outputs expected


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    acoustic(out_dir)
    amnets_step(out_dir)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/deploy")
