"""python -m benchmarks.lstm_precision: how far each lowrank_lstm_sequence face is from float64 autograd.

For fp32 inputs, per face (and for the Triton face per time loop), prints the largest absolute error of
the outputs and of every gradient, next to the largest magnitude of that tensor, and whether two runs on
the same inputs agree bit for bit (a run-to-run difference would mean a race, not rounding). A diagnostic
for tolerances on a GPU, where exp and division are the hardware's approximate instructions.
"""

import sys

import torch

import amnets_kernels as ak

from .harness import command_line

NAMES = ("out", "h_n", "c_n", "d x", "d h0", "d c0", "d w_ih_u", "d w_ih_v", "d w_hh_u", "d w_hh_v", "d bias")


def inputs(steps, batch, d, hidden, rank, rank_hh, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    # Factors scaled like an initialised layer (1/sqrt(fan-in)), so that the gates stay O(1) at any size.
    return [r(steps, batch, d), r(batch, hidden), r(batch, hidden), r(4 * hidden, rank, scale=rank ** -0.5),
            r(rank, d, scale=d ** -0.5), r(4 * hidden, rank_hh, scale=rank_hh ** -0.5),
            r(rank_hh, hidden, scale=hidden ** -0.5), r(4 * hidden, scale=0.1)]


def run(tensors, dtype, face=None):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    if face is None:  # float64 autograd through plain ops: the answer
        x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias = leaves
        outs = []
        for t in range(x.shape[0]):
            gates = (x[t] @ w_ih_v.T) @ w_ih_u.T + (h @ w_hh_v.T) @ w_hh_u.T + bias
            i, f, gg, o = gates.chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * gg.tanh()
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        result = (torch.stack(outs), h, c)
    else:
        with ak.use_backend(face):
            result = ak.lowrank_lstm_sequence(*leaves)
    weights = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=weights, dtype=torch.float64).to(r.device, r.dtype)).sum()
               for r in result)
    return [r.detach() for r in result] + list(torch.autograd.grad(loss, leaves))


def main(argv=None) -> int:
    command_line(__doc__, "benchmarks.lstm_precision").parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(8, 3, 11, 64, 6, 8), (100, 16, 256, 256, 64, 64), (100, 1, 1024, 1024, 256, 256)]
    variants = [("reference", None), ("triton", "persistent"), ("triton", "per_step"), ("cuda", None),
                ("cpu", None)]
    for shape in shapes:
        tensors = inputs(*shape, device)
        exact = run(tensors, torch.float64)
        print(f"\nT, B, D, H, r, rh = {shape} on {device}: max |error| / max |value| per tensor (fp32)")
        for face, path in variants:
            if ak.unavailable_reason("lowrank_lstm_sequence", face, device) is not None:
                continue
            label = face + (f" {path}" if path else "")
            if path is not None:
                from amnets_kernels.triton import lowrank_lstm as module
                saved = module.MAX_PERSISTENT_RANK
                module.MAX_PERSISTENT_RANK = saved if path == "persistent" else 0
                if (module.persistent_block_r(shape[3], shape[5]) is None) != (path == "per_step"):
                    module.MAX_PERSISTENT_RANK = saved
                    continue
            try:
                first, second = run(tensors, torch.float32, face), run(tensors, torch.float32, face)
            finally:
                if path is not None:
                    module.MAX_PERSISTENT_RANK = saved
            same = all(torch.equal(a, b) for a, b in zip(first, second))
            cells = [f"{n} {(a.double() - e).abs().max().item():.1e}/{e.abs().max().item():.1e}"
                     for n, a, e in zip(NAMES, first, exact)]
            print(f"  {label:18s} run-to-run {'identical' if same else 'DIFFERENT'}; " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
