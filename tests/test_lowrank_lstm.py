"""lowrank_lstm_cell / lowrank_lstm_sequence: every face against nn.LSTM built from U @ V; bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak

from conftest import DEVICE, FACES, use_face
from helpers import close, grads, rand

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def factors(d, hidden, rank, rank_hh, dtype=torch.float32, device=DEVICE, requires_grad=False, bias=True):
    w = [rand(4 * hidden, rank, dtype=dtype, device=device, scale=0.5),
         rand(rank, d, dtype=dtype, device=device, scale=0.5),
         rand(4 * hidden, rank_hh, dtype=dtype, device=device, scale=0.5),
         rand(rank_hh, hidden, dtype=dtype, device=device, scale=0.5),
         rand(4 * hidden, dtype=dtype, device=device) if bias else None]
    return [None if t is None else t.requires_grad_(requires_grad) for t in w]


def lstm_of(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
    """The independent answer: torch.nn.LSTM (float64) with W_ih = U V and W_hh = U V."""
    hidden = w_hh_v.shape[1]
    lstm = torch.nn.LSTM(w_ih_v.shape[1], hidden, bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(w_ih_u.double() @ w_ih_v.double())
        lstm.weight_hh_l0.copy_(w_hh_u.double() @ w_hh_v.double())
        if bias is not None:
            lstm.bias_ih_l0.copy_(bias.double())
            lstm.bias_hh_l0.zero_()
    return lstm.to(w_ih_u.device)


def autograd_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
    """Independent BPTT: plain PyTorch ops on float64 copies, differentiated by torch.autograd."""
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        g = (x[t] @ w_ih_v.T) @ w_ih_u.T + (h @ w_hh_v.T) @ w_hh_u.T + (0 if bias is None else bias)
        i, f, gg, o = g.chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * gg.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs), h, c


def leaf64(tensors):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("face", FACES)
@given(steps=st.integers(1, 5), batch=st.integers(1, 3), d=st.integers(1, 9), hidden=st.integers(1, 7),
       rank_frac=st.floats(0, 1), rank_hh_frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES),
       with_state=st.booleans(), has_bias=st.booleans())
def test_sequence_matches_lstm_and_autograd(face, steps, batch, d, hidden, rank_frac, rank_hh_frac, dtype,
                                            with_state, has_bias):
    rank = 1 + round(rank_frac * (min(4 * hidden, d) - 1))  # covers r = 1 and r = min dim
    rank_hh = 1 + round(rank_hh_frac * (hidden - 1))
    with use_face("lowrank_lstm_sequence", face):
        w = factors(d, hidden, rank, rank_hh, dtype, requires_grad=True, bias=has_bias)
        x = rand(steps, batch, d, dtype=dtype, device=DEVICE, requires_grad=True)
        state = [rand(batch, hidden, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2)] \
            if with_state else [None, None]
        out, h_n, c_n = ak.lowrank_lstm_sequence(x, *state, *w)
        assert out.shape == (steps, batch, hidden) and out.dtype == dtype
        lstm = lstm_of(*w)
        expected, (eh, ec) = lstm(x.double(), None if not with_state else
                                  (state[0].double()[None], state[1].double()[None]))
        for got, want in ((out, expected), (h_n, eh[0]), (c_n, ec[0])):
            close(got, want.detach(), dtype, scale=4)
        inputs = [x, *state, *w]
        got = grads((out, h_n, c_n), inputs)
        ref_inputs = leaf64(inputs)
        zeros = torch.zeros(batch, hidden, dtype=torch.float64, device=DEVICE)
        ref_state = [zeros if s is None else s for s in ref_inputs[1:3]]
        want = grads(autograd_sequence(ref_inputs[0], *ref_state, *ref_inputs[3:]), ref_inputs)
        for g, e in zip(got, want):
            assert (g is None) == (e is None)
            if g is not None:
                close(g, e, dtype, scale=4 * steps)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("hidden, batch, steps", [(16, 3, 5), (37, 3, 5), (64, 3, 5), (37, 3, 2), (37, 1, 5),
                                                  (37, 9, 5), (37, 9, 2), (37, 70, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_hidden_matches_autograd(face, hidden, batch, steps, dtype):
    """Hidden sizes spanning whole SIMD vectors plus a tail, through forward and BPTT; batches and lengths
    that take the CPU face's row dots (one row, or 3 rows for 2 steps: too few to pack for), its row kernels (3
    rows for 5 steps: one 3-row tile; 9 rows: two 4-row tiles and one row) and ATen's GEMM (9 rows for 2 steps;
    70 rows)."""
    with use_face("lowrank_lstm_sequence", face):
        w = factors(20, hidden, 8, 6, dtype, requires_grad=True)
        x = rand(steps, batch, 20, dtype=dtype, device=DEVICE, requires_grad=True)
        h0, c0 = (rand(batch, hidden, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
        out, h_n, c_n = ak.lowrank_lstm_sequence(x, h0, c0, *w)
        assert out.shape == (steps, batch, hidden) and h_n.shape == c_n.shape == (batch, hidden)
        assert out.dtype == dtype
        ref = leaf64([x, h0, c0, *w])
        e_out, e_h, e_c = autograd_sequence(*ref)
        for got, want in ((out, e_out), (h_n, e_h), (c_n, e_c)):
            close(got, want.detach(), dtype, scale=4)
        for g, e in zip(grads((out, h_n, c_n), [x, h0, c0, *w]), grads((e_out, e_h, e_c), ref)):
            close(g, e, dtype, scale=20)


@pytest.mark.parametrize("face", FACES)
@given(batch=st.integers(1, 4), d=st.integers(1, 9), hidden=st.integers(1, 7), dtype=st.sampled_from(DTYPES))
def test_cell_is_one_sequence_step(face, batch, d, hidden, dtype):
    with use_face("lowrank_lstm_cell", face):
        w = factors(d, hidden, min(3, d, 4 * hidden), min(2, hidden), dtype, requires_grad=True)
        x = rand(batch, d, dtype=dtype, device=DEVICE, requires_grad=True)
        h, c = (rand(batch, hidden, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
        h1, c1 = ak.lowrank_lstm_cell(x, h, c, *w)
        assert h1.shape == c1.shape == (batch, hidden) and h1.dtype == c1.dtype == dtype
        ref = leaf64([x, h, c, *w])
        _, eh, ec = autograd_sequence(ref[0][None], *ref[1:])
        close(h1, eh.detach(), dtype, scale=4)
        close(c1, ec.detach(), dtype, scale=4)
        for g, e in zip(grads((h1, c1), [x, h, c, *w]), grads((eh, ec), ref)):
            close(g, e, dtype, scale=4)


@pytest.mark.parametrize("face", FACES)
@given(batch=st.integers(0, 6), d=st.integers(1, 40), hidden=st.integers(1, 40), has_bias=st.booleans(),
       strided=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_inference_step_matches_float64(face, batch, d, hidden, has_bias, strided, dtype):
    """The streaming step (no autograd): the cpu face's row-dot path for B <= 4 (B = 0 included; bf16 on
    vdpbf16ps where the CPU has it), the sequence path above it, and a strided x, against float64 math."""
    with use_face("lowrank_lstm_cell", face), torch.no_grad():
        w = factors(d, hidden, min(5, d, 4 * hidden), min(4, hidden), dtype, bias=has_bias)
        x = rand(batch, 2 * d, dtype=dtype, device=DEVICE)
        x = x[:, ::2] if strided else x[:, :d].contiguous()
        h, c = (rand(batch, hidden, dtype=dtype, device=DEVICE) for _ in range(2))
        h1, c1 = ak.lowrank_lstm_cell(x, h, c, *w)
        assert h1.shape == c1.shape == (batch, hidden) and not h1.requires_grad and h1.dtype == c1.dtype == dtype
        _, eh, ec = autograd_sequence(*(None if t is None else t.double() for t in (x[None], h, c, *w)))
        close(h1, eh, dtype, scale=4)
        close(c1, ec, dtype, scale=4)
        # A one-step sequence (a swapped LowRankLSTM streaming a frame a call) takes the same step on the cpu face.
        out, h_n, c_n = ak.lowrank_lstm_sequence(x[None], h, c, *w)
        assert out.shape == (1, batch, hidden) and torch.equal(out[0], h_n) and h_n.dtype == dtype
        assert batch == 0 or out.data_ptr() != h_n.data_ptr()  # separate outputs, never views of one another
        close(h_n, eh, dtype, scale=4)
        close(c_n, ec, dtype, scale=4)


def bf16_forward_emulated(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
    """The CPU face's bf16 forward in float64 with its roundings: the input projection by bf16 GEMMs (each
    product rounded to bf16, the bias added before the second rounding), h and s rounded to bf16 before the
    recurrent products, everything else unrounded."""
    r = lambda t: t.bfloat16().double()
    d = [t.double() for t in (x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)]
    x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias = d
    pre = r(r(x @ w_ih_v.T) @ w_ih_u.T + bias)
    outs = []
    for t in range(x.shape[0]):
        g = pre[t] + r(r(h) @ w_hh_v.T) @ w_hh_u.T
        i, f, gg, o = g.chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * gg.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("batch, steps, hidden, rank_hh", [(1, 3, 37, 7), (4, 2, 50, 33), (2, 1, 100, 64),
                                                          (3, 5, 37, 7), (5, 4, 37, 7), (16, 6, 70, 65),
                                                          (64, 4, 20, 5), (9, 4, 40, 40), (17, 4, 24, 3)])
@pytest.mark.parametrize("amx", ["auto", "emulate"])
def test_cpu_bf16_forward_keeps_bf16_factors(batch, steps, hidden, rank_hh, amx):
    """bf16 input and factors on a CPU with AVX512-BF16: the forward's products run on vdpbf16ps (pair panels
    from 2 to 64 rows with 4 steps or more, row dots below), the panels on AMX tiles from 8 rows where the CPU
    has them ("auto"; "emulate" runs that tile program on the scalar emulation of AMX, csrc/cpu/amx.h, on any
    CPU). Against float64 math with the same roundings, to a tenth of the bf16 tolerance (a dropped product term
    or a pair read out of order misses by far more); shapes with a partial vector in every product: H and r not
    multiples of 16 or 32, odd r (a half pair), 4H over several 64-column panels, partial 16-row tiles."""
    from amnets_kernels import _backend

    if DEVICE != "cpu" or not ak.build_info()["cpu_bf16_lowrank_lstm_kernel"].startswith("avx512_bf16"):
        pytest.skip("the cpu face's bf16 kernels need a CPU with AVX512-BF16")
    if amx == "emulate" and batch < 8:
        pytest.skip("below the tile kernels' rows")
    # Factors scaled so that the gates are O(1): with factors() as they are (U V entries ~ 0.25 sqrt(r)) the
    # gates reach ~10 at r = 65 and the roundings alone move outputs by ~1 (float64 with and without them).
    w = [t * s for t, s in zip(factors(45, hidden, 19, rank_hh, torch.float64, "cpu"),
                               (19 ** -0.5, 45 ** -0.5, rank_hh ** -0.5, hidden ** -0.5, 1))]
    w = [t.bfloat16() for t in w]
    x = rand(steps, batch, 45, dtype=torch.bfloat16)
    h0, c0 = (rand(batch, hidden, dtype=torch.bfloat16) for _ in range(2))
    _backend._C.set_cpu_amx(amx)
    try:
        with use_face("lowrank_lstm_sequence", "cpu"), torch.no_grad():
            got = ak.lowrank_lstm_sequence(x, h0, c0, *w)
    finally:
        _backend._C.set_cpu_amx("auto")
    for g, e in zip(got, bf16_forward_emulated(x, h0, c0, *w)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), e, rtol=4e-3, atol=8e-3)


# ---------------------------------------------------------------------------------------------------
# the Triton face's two time loops: the persistent kernels and one launch per step


def _triton_lstm():
    reason = ak.unavailable_reason("lowrank_lstm_sequence", "triton", DEVICE)
    if reason is not None:
        pytest.skip(f"triton face of lowrank_lstm_sequence: {reason}")
    from amnets_kernels.triton import lowrank_lstm

    return lowrank_lstm


@pytest.mark.parametrize("path", ["persistent", "per_step"])
@pytest.mark.parametrize("steps, batch, hidden, rank_hh, dtype", [
    (8, 3, 64, 8, torch.float32),  # H = 64, T = 8
    (3, 17, 37, 20, torch.float32),  # two batch tiles, a hidden tail, BLOCK_R = 32
    (2, 2, 70, 64, torch.float64),  # BLOCK_R = 64 (the largest persistent one), fp64 kernels
    (3, 2, 20, 5, torch.bfloat16),
])
def test_triton_time_loops_match_autograd(monkeypatch, path, steps, batch, hidden, rank_hh, dtype):
    """Both time loops of the Triton face (forced), forward with and without the saved workspace,
    BPTT and the cell, against float64 autograd."""
    module = _triton_lstm()
    if path == "per_step":
        monkeypatch.setattr(module, "MAX_PERSISTENT_RANK", 0)
    assert (module.persistent_block_r(hidden, rank_hh) is None) == (path == "per_step")
    with ak.use_backend("triton"):
        w = factors(11, hidden, 6, rank_hh, dtype, requires_grad=True)
        x = rand(steps, batch, 11, dtype=dtype, device=DEVICE, requires_grad=True)
        h0, c0 = (rand(batch, hidden, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
        out, h_n, c_n = ak.lowrank_lstm_sequence(x, h0, c0, *w)
        with torch.no_grad():  # save=False: no gates/cells written (a separately compiled kernel on a GPU)
            for got, want in zip(ak.lowrank_lstm_sequence(x, h0, c0, *w), (out, h_n, c_n)):
                close(got, want.detach(), dtype)
        ref = leaf64([x, h0, c0, *w])
        e_out, e_h, e_c = autograd_sequence(*ref)
        for got, want in ((out, e_out), (h_n, e_h), (c_n, e_c)):
            close(got, want.detach(), dtype, scale=4)
        # Gradients reach ~60 here, and fp32 rounding of their long sums grows with them: the reference
        # and cpu faces miss float64 by 1.4e-3 at a magnitude of 59 (d w_hh_u), the persistent Triton
        # kernels on an H200 (approximate exp and division) by 2.9e-3; so atol grows with the magnitude.
        for g, e in zip(grads((out, h_n, c_n), [x, h0, c0, *w]), grads((e_out, e_h, e_c), ref)):
            close(g, e, dtype, scale=16 * steps * max(1.0, e.abs().max().item() / 10))
        h1, c1 = ak.lowrank_lstm_cell(x[0], h0, c0, *w)
        _, eh, ec = autograd_sequence(ref[0][:1], *ref[1:])
        close(h1, eh.detach(), dtype, scale=4)
        close(c1, ec.detach(), dtype, scale=4)
        for g, e in zip(grads((h1, c1), [x, h0, c0, *w]), grads((eh, ec), [ref[0], *ref[1:]])):
            close(g, e, dtype, scale=4)


def test_triton_large_rank_takes_the_per_step_path():
    """rh > MAX_PERSISTENT_RANK cannot run persistent (registers): the per-step kernels take it."""
    module = _triton_lstm()
    assert module.persistent_block_r(80, 72) is None
    with ak.use_backend("triton"):
        w = factors(7, 80, 5, 72, requires_grad=True)
        x = rand(2, 2, 7, device=DEVICE, requires_grad=True)
        out, h_n, c_n = ak.lowrank_lstm_sequence(x, None, None, *w)
        ref = leaf64([x, *w])
        zeros = torch.zeros(2, 80, dtype=torch.float64, device=DEVICE)
        e_out, e_h, e_c = autograd_sequence(ref[0], zeros, zeros, *ref[1:])
        for got, want in ((out, e_out), (h_n, e_h), (c_n, e_c)):
            close(got, want.detach(), torch.float32, scale=4)
        for g, e in zip(grads((out, h_n, c_n), [x, *w]), grads((e_out, e_h, e_c), ref)):
            close(g, e, torch.float32, scale=8)


def test_triton_launchers_use_only_aot_checked_configurations():
    """Every configuration the launchers can pick is in AOT_CONFIGS (python -m amnets_kernels.aot)."""
    module = _triton_lstm()
    names = {c.name for c in module.AOT_CONFIGS}
    picked = set()
    for acc in (torch.float32, torch.float64):
        for hidden in (1, 16, 100, 1024, 4096, 8192):
            for rank in range(1, min(hidden, 200) + 1):
                block_r = module.persistent_block_r(hidden, rank)
                if block_r is not None:
                    blocks = dict(BLOCK_B=module.BLOCK_B, BLOCK_H=module.PERSISTENT_BLOCK_H, BLOCK_R=block_r)
                    for kernel in (module._sequence_forward_kernel, module._sequence_backward_kernel):
                        picked.add(module._config_name(kernel, acc, blocks))
        picked.add(module._config_name(module._step_forward_kernel, acc, dict(
            BLOCK_B=module.BLOCK_B, BLOCK_H=module.STEP_BLOCK_H, BLOCK_R=module.STEP_BLOCK_R)))
        picked.add(module._config_name(module._step_backward_kernel, acc, dict(
            BLOCK_B=module.BLOCK_B, BLOCK_H=module.STEP_POINTWISE_H)))
    assert picked <= names


def test_reference_gradcheck_float64():
    with ak.use_backend("reference"):
        w = factors(3, 2, 2, 2, torch.float64, device="cpu", requires_grad=True)
        x = rand(3, 2, 3, dtype=torch.float64, requires_grad=True)
        h0, c0 = (rand(2, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(lambda *a: ak.lowrank_lstm_sequence(*a), (x, h0, c0, *w))
        assert torch.autograd.gradcheck(lambda *a: ak.lowrank_lstm_cell(*a), (x[0], h0, c0, *w))


def test_full_rank_reproduces_nn_lstm():
    """Truncated SVD at full rank gives back the nn.LSTM to 1e-5 (the LowRankLSTM.from_lstm promise)."""
    lstm = torch.nn.LSTM(6, 4)
    w_ih_u, w_ih_v = ak.lowrank_factors(lstm.weight_ih_l0, 6)
    w_hh_u, w_hh_v = ak.lowrank_factors(lstm.weight_hh_l0, 4)
    x = rand(5, 3, 6)
    with ak.use_backend("reference"):
        out, h_n, c_n = ak.lowrank_lstm_sequence(x, None, None, w_ih_u, w_ih_v, w_hh_u, w_hh_v,
                                                 (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach())
    expected, (eh, ec) = lstm(x)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(c_n, ec[0].detach(), rtol=0, atol=1e-5)


def test_opcheck_and_compile():
    with ak.use_backend("reference"):
        w = factors(5, 3, 2, 2, requires_grad=True, device="cpu")
        x = rand(4, 2, 5, requires_grad=True)
        h0, c0 = (rand(2, 3, requires_grad=True) for _ in range(2))
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_sequence_forward.default, (x, h0, c0, *w, True))
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_sequence.default, (x, None, c0, *w))
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_cell_forward.default, (x[0], h0, c0, *w, True))
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_cell.default, (x[0], h0, c0, *w))
        with torch.no_grad():
            out, h_n, c_n, gates, cells = torch.ops.amnets.lowrank_lstm_sequence_forward(x, h0, c0, *w, True)
            h1, c1, cell_gates = torch.ops.amnets.lowrank_lstm_cell_forward(x[0], h0, c0, *w, True)
        plain = [t.detach() for t in w[:4]]
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_sequence_backward.default,
                              (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x.detach(),
                               h0.detach(), c0.detach(), *plain, out, gates, cells))
        torch.library.opcheck(torch.ops.amnets.lowrank_lstm_cell_backward.default,
                              (torch.randn_like(h1), torch.randn_like(c1), x[0].detach(), h0.detach(), c0.detach(),
                               *plain, c1, cell_gates))

        def f(x, h0, c0, *w):
            out, h, c = torch.ops.amnets.lowrank_lstm_sequence(x, h0, c0, *w)
            h1, c1 = torch.ops.amnets.lowrank_lstm_cell(x[0], h, c, *w)
            return out.sum() + h1.sum() + c1.sum()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y, y_eager = compiled(x, h0, c0, *w), f(x, h0, c0, *w)
        close(y, y_eager)
        for g, e in zip(torch.autograd.grad(y, [x, h0, *w[:4]]), torch.autograd.grad(y_eager, [x, h0, *w[:4]])):
            close(g, e)


def test_no_workspace_without_grad():
    w = factors(5, 3, 2, 2, device="cpu")
    x = rand(4, 2, 5)
    h0 = c0 = torch.zeros(2, 3)
    with ak.use_backend("reference"):
        *_, gates, cells = torch.ops.amnets.lowrank_lstm_sequence_forward(x, h0, c0, *w, False)
        assert gates.numel() == 0 and cells.numel() == 0
        out, h_n, c_n, gates, cells = torch.ops.amnets.lowrank_lstm_sequence_forward(x, h0, c0, *w, True)
        with pytest.raises(RuntimeError, match="forward ran with save=False"):
            torch.ops.amnets.lowrank_lstm_sequence_backward(out, h_n, c_n, x, h0, c0, *w[:4], out,
                                                            gates.new_empty(0), cells)


# ---------------------------------------------------------------------------------------------------
# bad input


def _seq_args():
    w = factors(5, 3, 2, 2, device="cpu")
    return dict(x=rand(4, 2, 5), h0=None, c0=None, w_ih_u=w[0], w_ih_v=w[1], w_hh_u=w[2], w_hh_v=w[3], bias=w[4])


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(4, 2, 6)), ValueError, r"x's last dim \(D = 6\) and w_ih_v's columns \(5\) must agree; "
                                                r"got x of shape \(4, 2, 6\), w_ih_v of shape \(2, 5\)"),
    (dict(w_ih_v=torch.zeros(2, 6)), ValueError, r"x's last dim \(D = 5\) and w_ih_v's columns \(6\) must agree"),
    (dict(w_ih_v=torch.zeros(3, 5)), ValueError, r"w_ih_v must have shape \(rank, D\) = \(2, 5\)"),
    (dict(x=torch.zeros(2, 5)), ValueError, r"x must be 3-D"),
    (dict(x=torch.zeros(0, 2, 5)), ValueError, r"at least one time step"),
    (dict(h0=torch.zeros(3, 3)), ValueError, r"h0 must have shape \(B, H\) = \(2, 3\)"),
    (dict(w_ih_u=torch.zeros(11, 2)), ValueError, r"w_ih_u must have 4\*H = 12 rows"),
    (dict(w_hh_u=torch.zeros(12, 4), w_hh_v=torch.zeros(4, 3)), ValueError,
     r"rank of w_hh \(w_hh_u.shape\[1\] = 4\) must be in \[1, min\(4\*H, H\)\] = \[1, 3\]"),
    (dict(w_ih_u=torch.zeros(12, 2, dtype=torch.float64)), TypeError, r"w_ih_u has dtype torch.float64"),
    (dict(bias=torch.zeros(13)), ValueError, r"bias must have shape \(4\*H,\) = \(12,\)"),
    (dict(x=torch.zeros(4, 2, 5, dtype=torch.int64)), TypeError, r"x must have dtype"),
    (dict(w_hh_v="no"), TypeError, r"w_hh_v must be a torch.Tensor; got str"),
])
def test_sequence_bad_arguments(change, error, match):
    args = _seq_args()
    args.update(change)
    with ak.use_backend("reference"), pytest.raises(error, match="lowrank_lstm_sequence: .*" + match):
        ak.lowrank_lstm_sequence(*args.values())


def test_cell_bad_arguments():
    w = factors(5, 3, 2, 2, device="cpu")
    with pytest.raises(ValueError, match=r"lowrank_lstm_cell: c must have shape \(B, H\) = \(2, 3\)"):
        ak.lowrank_lstm_cell(torch.zeros(2, 5), torch.zeros(2, 3), torch.zeros(2, 4), *w)
    with pytest.raises(TypeError, match=r"lowrank_lstm_cell: h must be a torch.Tensor; got NoneType"):
        ak.lowrank_lstm_cell(torch.zeros(2, 5), None, torch.zeros(2, 3), *w)
    for face in FACES:  # x off by one feature: x is named too (only w_ih_v was)
        with ak.use_backend(face), pytest.raises(ValueError, match=r"lowrank_lstm_cell: x's last dim \(D = 6\) "
                                                                    r"and w_ih_v's columns \(5\) must agree"):
            ak.lowrank_lstm_cell(torch.zeros(2, 6), torch.zeros(2, 3), torch.zeros(2, 3), *w)


@pytest.mark.parametrize("face", FACES)
def test_empty_batch_every_face(face):
    """B = 0: empty outputs, the state passed through, zero weight gradients, on every face alike."""
    with use_face("lowrank_lstm_sequence", face):
        x = torch.randn(3, 0, 4, device=DEVICE, requires_grad=True)
        w = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((8, 2), (2, 4), (8, 2), (2, 2))]
        out, h, c = ak.lowrank_lstm_sequence(x, None, None, *w)
        assert out.shape == (3, 0, 2) and h.shape == c.shape == (0, 2)
        out.sum().backward()
        assert all(t.grad is not None and not t.grad.any() for t in w)
        h1, c1 = ak.lowrank_lstm_cell(x[0], torch.zeros(0, 2, device=DEVICE), torch.zeros(0, 2, device=DEVICE), *w)
        assert h1.shape == c1.shape == (0, 2)
