"""lowrank_lstm_sequence against nn.LSTM (dense, same H) and against the unfused PyTorch low-rank
composition (a Python loop of two small matmuls per gate matrix). Headline shapes below."""

import functools

import torch

import amnets_kernels as ak

from .harness import DTYPE_NAMES, Candidate, Case, backward_of, everything, face_candidates, inference, pick_grid

FULL = dict(hidden=1024, ranks=[64, 128, 256], steps=100, batches=[1, 4, 16, 64],
            dtypes=[torch.float32, torch.bfloat16], modes=["fwd", "fwd+bwd"])
GPU = dict(FULL, ranks=[128, 256], batches=[1, 16, 64])
QUICK = dict(hidden=256, ranks=[64], steps=20, batches=[1, 16], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"])


def unfused_lowrank(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
    """What one writes in plain PyTorch: a step loop, every product a separate op."""
    outs = []
    for t in range(x.shape[0]):
        gates = (x[t] @ w_ih_v.T) @ w_ih_u.T + (h @ w_hh_v.T) @ w_hh_u.T + bias
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs), h, c


def cases(device: torch.device, quick: bool, wanted=everything):
    grid = pick_grid(device, quick, FULL, QUICK, GPU)
    hidden, steps = grid["hidden"], grid["steps"]
    for dtype in grid["dtypes"]:
        for mode in grid["modes"]:
            train = mode == "fwd+bwd"
            # built for the first wanted case, shared by the others
            lstm = functools.cache(functools.partial(_lstm, hidden, dtype, train, device))
            for rank in grid["ranks"]:
                factors = functools.cache(functools.partial(_factors, lstm, rank, dtype, train, device))
                for batch in grid["batches"]:
                    if wanted(case_name(hidden, rank, steps, batch, dtype)):
                        yield _case(lstm(), *factors(), dtype, mode, rank, batch, steps, device)


def _lstm(hidden, dtype, train, device):
    return torch.nn.LSTM(hidden, hidden).to(device=device, dtype=dtype).requires_grad_(train)


def _factors(lstm, rank, dtype, train, device):
    """The rank-`rank` factors of lstm()'s two gate matrices, and its summed bias."""
    w_ih_u, w_ih_v = ak.lowrank_factors(lstm().weight_ih_l0.float(), rank)
    w_hh_u, w_hh_v = ak.lowrank_factors(lstm().weight_hh_l0.float(), rank)
    factors = [t.to(device, dtype).requires_grad_(train) for t in (w_ih_u, w_ih_v, w_hh_u, w_hh_v)]
    return factors, (lstm().bias_ih_l0 + lstm().bias_hh_l0).detach().clone().requires_grad_(train)


def case_name(hidden, rank, steps, batch, dtype) -> str:
    return f"H=D={hidden} r={rank} T={steps} B={batch} {DTYPE_NAMES[dtype]}"


def _case(lstm, factors, bias, dtype, mode, rank, batch, steps, device):
    hidden = lstm.hidden_size
    train = mode == "fwd+bwd"
    wrap = backward_of if train else inference
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=train)
    zeros = torch.zeros(batch, hidden, device=device, dtype=dtype)
    baseline = Candidate("nn.LSTM (dense)", wrap(lambda: lstm(x)[0]), "baseline")
    others = [Candidate("PyTorch low-rank loop", wrap(lambda: unfused_lowrank(x, zeros, zeros, *factors, bias)[0]),
                        "other", "unfused: 4 matmuls + pointwise ops per step")]
    faces, skipped = face_candidates("lowrank_lstm_sequence", device,
                                     wrap(lambda: ak.lowrank_lstm_sequence(x, None, None, *factors, bias)[0]))
    name = case_name(hidden, rank, steps, batch, dtype)
    params = dict(hidden=hidden, input=hidden, rank=rank, steps=steps, batch=batch, dtype=DTYPE_NAMES[dtype])
    # Bytes of factors a step must read: the recurrent pair every step, the input pair once per frame.
    factor_bytes = sum(f.numel() * f.element_size() for f in factors)

    def derive(seconds):
        return f"{seconds / steps * 1e6:.0f} us/frame, {factor_bytes * steps / seconds / 1e9:.1f} GB/s of factors"

    return Case("lowrank_lstm_sequence", name, mode, params, baseline, others + faces, skipped, derive)


def headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline shape."""
    return (params["hidden"], params["rank"], params["dtype"]) == (1024, 256, "fp32") and params["batch"] in (1, 16)
