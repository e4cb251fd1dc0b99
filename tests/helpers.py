"""Helpers shared by the op tests: tolerances per dtype, small input builders, the label-check mode."""

import contextlib

import torch

import amnets_kernels as ak

# (rtol, atol) for comparing a face with independent math; fp16/bf16 inputs are rounded on the way in
# and out, computed in fp32 in between.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@contextlib.contextmanager
def label_checks(mode: str):
    """The RNN-T losses' label checks set to `mode` ("host" / "device" / "auto") inside, the previous mode after."""
    previous = ak.get_label_checks()
    ak.set_label_checks(mode)
    try:
        yield
    finally:
        ak.set_label_checks(previous)


def close(actual, expected, dtype=None, scale=1.0):
    """assert_close with the dtype's tolerance (atol scaled by `scale` for large-magnitude results)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale)


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def grads(outputs, inputs, seed=0):
    """Gradients of sum(out * fixed random weights) w.r.t. inputs (None where an input gets none)."""
    gen = torch.Generator().manual_seed(seed)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    total = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                for o in outputs)
    wanted = [i for i in inputs if i is not None and i.requires_grad]
    got = iter(torch.autograd.grad(total, wanted, allow_unused=True))
    return [next(got) if (i is not None and i.requires_grad) else None for i in inputs]
