"""AmNetsEncoder.stream (the switching encoder through the kernels) against the dense encoder (an nn.LSTM
stack, layer-major over the chunk: the offline dense encoder), against the dense encoder streamed the
way a live stream runs (stream(force="full"): every layer per frame), and against the same switching
encoder computed with dense matmuls on its cheap branch's dense equivalent (the block mask applied to W,
or U @ V multiplied out): the FLOP-only baseline, whose cheap frames save multiply-adds on paper but not
time. Headline shapes: input 240 (3 stacked 80-dim
frames), H=1024, 3 layers, T=20 frames; sparse branch 0.8 at block 32, low-rank branch r=128.

The fraction f of full-branch frames is forced: at B=1 the whole stream takes "full" or "cheap"; at B=64
the first round(f * 64) rows take the full branch on every frame and the others the cheap one.
"""

import functools

import torch
import torch.nn.functional as F

from amnets.encoder import AmNetsEncoder, lstm_pointwise

from .harness import Candidate, Case, everything, face_candidates, inference, pick_grid

FULL = dict(input=240, hidden=1024, layers=3, steps=20, sparsity=0.8, block=32, rank=128,
            batches={1: [0.0, 1.0], 64: [0.0, 0.25, 0.5, 0.75, 1.0]},
            reference=False)  # the oracle face (densified blocks) would double the time for no insight
QUICK = dict(input=48, hidden=64, layers=2, steps=5, sparsity=0.8, block=16, rank=16,
             batches={1: [0.0, 1.0], 8: [0.5]}, reference=True)
# The op whose faces each cheap branch runs on (stream() calls it for every cheap row).
OPS = {"sparse": "bsr_linear", "lowrank": "lowrank_lstm_cell"}


def dense_lstm(enc: AmNetsEncoder) -> torch.nn.LSTM:
    """nn.LSTM (batch_first) with the encoder's full weights: the dense encoder."""
    lstm = torch.nn.LSTM(enc.input_size, enc.hidden_size, enc.num_layers, batch_first=True)
    with torch.no_grad():
        for k in range(enc.num_layers):
            getattr(lstm, f"weight_ih_l{k}").copy_(getattr(enc, f"weight_ih_l{k}"))
            getattr(lstm, f"weight_hh_l{k}").copy_(getattr(enc, f"weight_hh_l{k}"))
            getattr(lstm, f"bias_ih_l{k}").copy_(getattr(enc, f"bias_l{k}"))
            getattr(lstm, f"bias_hh_l{k}").zero_()
    return lstm


def dense_equivalent(enc: AmNetsEncoder) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ([W_ih | W_hh], its cheap branch as a dense matrix (masked, or U @ V multiplied out), bias),
    built once, as a deployed FLOP-only model would hold them."""
    with torch.no_grad():
        return [(enc.full_weight(k), enc.cheap_weight(k), getattr(enc, f"bias_l{k}").detach())
                for k in range(enc.num_layers)]


def flop_only_stream(enc: AmNetsEncoder, weights, x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """What stream() computes, with every branch a dense (4H, D + H) matmul on dense_equivalent(enc)'s
    weights: full rows use [W_ih | W_hh], cheap rows the cheap branch's dense copy."""
    rows, cheap_rows = full.nonzero().squeeze(1), (~full).nonzero().squeeze(1)
    B, H = x.shape[0], enc.hidden_size
    h = [x.new_zeros(B, H) for _ in weights]
    c = [x.new_zeros(B, H) for _ in weights]
    for t in range(x.shape[1]):
        inp = x[:, t]
        for k, (w_full, w_cheap, bias) in enumerate(weights):
            z = torch.cat([inp, h[k]], dim=1)
            gates = torch.empty(B, 4 * H, dtype=x.dtype, device=x.device)
            gates[rows] = F.linear(z[rows], w_full, bias)
            gates[cheap_rows] = F.linear(z[cheap_rows], w_cheap, bias)
            h[k], c[k] = lstm_pointwise(gates, c[k])
            inp = h[k]
    return inp


def cases(device: torch.device, quick: bool, wanted=everything):
    grid = pick_grid(device, quick, FULL, QUICK)
    for cheap in ("sparse", "lowrank"):
        models = functools.cache(functools.partial(_models, grid, cheap, device))  # for the first wanted case
        for batch, fractions in grid["batches"].items():
            for f in fractions:
                if wanted(case_name(grid, cheap, batch, f)):
                    yield _case(*models(), grid, batch, f, device)


def _models(grid, cheap, device):
    """The switching encoder of `cheap`'s branch and its dense nn.LSTM stack."""
    torch.manual_seed(0)
    enc = AmNetsEncoder(grid["input"], grid["hidden"], grid["layers"], cheap=cheap,
                        sparsity=grid["sparsity"], block_size=grid["block"], rank=grid["rank"])
    enc = enc.to(device).eval()
    return enc, dense_lstm(enc).to(device).eval()


def case_name(grid, cheap, batch, f) -> str:
    branch = f"b={grid['block']} s={float(grid['sparsity'])}" if cheap == "sparse" else f"r={grid['rank']}"
    return (f"{cheap} {branch} D={grid['input']} H={grid['hidden']} L={grid['layers']} T={grid['steps']} "
            f"B={batch} f={f:g}")


def _case(enc, lstm, grid, batch, f, device):
    steps = grid["steps"]
    x = torch.randn(batch, steps, enc.input_size, device=device)
    full = torch.arange(batch, device=device) < round(f * batch)
    weights = dense_equivalent(enc)
    force = ("full" if f == 1.0 else "cheap") if batch == 1 else full
    baseline = Candidate("nn.LSTM (dense)", inference(lambda: lstm(x)[0]), "baseline", "all frames full")
    others = [Candidate("dense-equivalent cheap branch (FLOP-only)",
                        inference(lambda: flop_only_stream(enc, weights, x, full)), "other",
                        "mask applied / U @ V multiplied out, dense matmul"),
              Candidate("dense stream (every row full, frame by frame)",
                        inference(lambda: enc.stream(x, force="full")[0]), "other",
                        "the streaming dense encoder: stream(force='full'), all layers per frame")]
    faces, skipped = face_candidates(OPS[enc.cheap], device, inference(lambda: enc.stream(x, force=force)[0]),
                                     skip_reference=None if grid["reference"] else
                                     "the pure-PyTorch oracle: not timed on the full grid")
    name = case_name(grid, enc.cheap, batch, f)
    params = dict(cheap=enc.cheap, input=enc.input_size, hidden=enc.hidden_size, layers=enc.num_layers,
                  steps=steps, batch=batch, full_fraction=f, block=enc.block_size, sparsity=enc.sparsity,
                  rank=grid["rank"], dtype="fp32")
    macs = f * enc.macs_per_frame("full") + (1 - f) * enc.macs_per_frame("cheap") - enc.arbitrator_macs()

    def derive(seconds):
        return f"{seconds / steps * 1e6:.0f} us/frame, {macs:.3g} MACs/frame/row"

    return Case("amnets_encoder", name, "fwd", params, baseline, others + faces, skipped, derive)


def headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline encoder, one stream all cheap or all full, and B=64 half full."""
    return (params["hidden"], params["layers"]) == (1024, 3) and \
        (params["batch"], params["full_fraction"]) in ((1, 0.0), (1, 1.0), (64, 0.5))
