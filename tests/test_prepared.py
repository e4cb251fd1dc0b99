"""Prepared streaming ops (PreparedBsrLinear, PreparedLowrankLstmCell, PreparedBsrLstmCell): the same answer
as the public ops on every face, the fused CPU step against float64 math, autograd through them, and bad
input named."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix

from conftest import DEVICE, FACES, use_face
from helpers import close, grads, rand


def sparse(out_f, in_f, block=16, sparsity=0.5, dtype=torch.float32):
    return BlockSparseMatrix.from_dense(rand(out_f, in_f, dtype=dtype, device=DEVICE), block, sparsity=sparsity)


def lstm_step_64(x, h, c, weight, bias):
    """The independent answer: the LSTM step on the densified [W_ih | W_hh], in float64."""
    gates = F.linear(torch.cat([x, h], 1).double(), weight.to_dense().double(),
                     None if bias is None else bias.double())
    hidden = h.shape[1]
    i, f, g, o = (gates[:, k * hidden:(k + 1) * hidden] for k in range(4))  # nn.LSTM's gate order
    c1 = f.sigmoid() * c.double() + i.sigmoid() * g.tanh()
    return o.sigmoid() * c1.tanh(), c1


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 1)])
def test_prepared_bsr_linear_is_bsr_linear(face, lead):
    with use_face("bsr_linear", face):
        w, bias = sparse(40, 70), rand(40, device=DEVICE)
        x = rand(*lead, 5, 70, device=DEVICE)
        for b in (bias, None):
            assert torch.equal(ak.PreparedBsrLinear(w, b)(x), ak.bsr_linear(x, w, b))


@pytest.mark.parametrize("face", FACES)
def test_prepared_lowrank_cell_is_lowrank_cell(face):
    with use_face("lowrank_lstm_cell", face):
        H, D = 24, 20
        weights = [rand(4 * H, 6, device=DEVICE), rand(6, D, device=DEVICE), rand(4 * H, 5, device=DEVICE),
                   rand(5, H, device=DEVICE), rand(4 * H, device=DEVICE)]
        x, h, c = rand(3, D, device=DEVICE), rand(3, H, device=DEVICE), rand(3, H, device=DEVICE)
        got = ak.PreparedLowrankLstmCell(*weights)(x, h, c)
        want = ak.lowrank_lstm_cell(x, h, c, *weights)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@given(batch=st.integers(1, 10), hidden=st.integers(1, 70), width=st.integers(1, 70),
       block=st.sampled_from([16, 32, 64]), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       has_bias=st.booleans(), scale=st.sampled_from([1.0, 30.0]))
def test_fused_bsr_lstm_step_matches_float64(batch, hidden, width, block, sparsity, has_bias, scale):
    """The CPU face's fused step (M < 8 and M >= 8 kernels, partial blocks, H not a multiple of 16) and, on
    other devices, bsr_linear + the update: float64 math on the densified weight; finite for large input."""
    w = sparse(4 * hidden, width + hidden, block, sparsity)
    bias = rand(4 * hidden, device=DEVICE) if has_bias else None
    x, h, c = (rand(batch, n, device=DEVICE, scale=scale) for n in (width, hidden, hidden))
    cell = ak.PreparedBsrLstmCell(w, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused path's notice, on a GPU
        h1, c1 = cell(x, h, c)
    assert cell.last_path == ("fused" if DEVICE == "cpu" else "bsr_linear + pointwise")
    assert torch.isfinite(h1).all() and torch.isfinite(c1).all()
    h_ref, c_ref = lstm_step_64(x, h, c, w, bias)
    close(h1, h_ref, torch.float32, scale=scale * (width + hidden) ** 0.5)
    close(c1, c_ref, torch.float32, scale=scale * (width + hidden) ** 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
def test_bsr_lstm_step_other_dtypes(dtype):
    """bf16 has the fused kernel; float64 and float16 take bsr_linear + the update and say so once."""
    w = sparse(4 * 20, 36 + 20, 16, 0.5, dtype=dtype)
    bias = rand(80, dtype=dtype, device=DEVICE)
    x, h, c = rand(3, 36, dtype=dtype, device=DEVICE), rand(3, 20, dtype=dtype, device=DEVICE), \
        rand(3, 20, dtype=dtype, device=DEVICE)
    cell = ak.PreparedBsrLstmCell(w, bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h1, c1 = cell(x, h, c)
    fused = DEVICE == "cpu" and dtype == torch.bfloat16
    assert cell.last_path == ("fused" if fused else "bsr_linear + pointwise")
    assert h1.dtype == dtype and c1.dtype == dtype
    h_ref, c_ref = lstm_step_64(x, h, c, w, bias)
    close(h1, h_ref, dtype, scale=8.0)
    close(c1, c_ref, dtype, scale=8.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_bsr_lstm_step_follows_a_dtype_switch_after_preparation(dtype):
    """values.data and bias.data switched to a dtype without the fused kernel after the cell was prepared: the
    step takes bsr_linear + the update (before: the fused kernel's TypeError, "no fast kernel")."""
    w, bias = sparse(4 * 20, 36 + 20, 16, 0.5), rand(80, device=DEVICE)
    cell = ak.PreparedBsrLstmCell(w, bias)
    w.values.data, bias.data = w.values.data.to(dtype), bias.data.to(dtype)
    x, h, c = (rand(3, n, dtype=dtype, device=DEVICE) for n in (36, 20, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused path's and bsr_linear's notices
        h1, c1 = cell(x, h, c)
    assert cell.last_path == "bsr_linear + pointwise"
    assert h1.dtype == dtype
    close(h1, lstm_step_64(x, h, c, w, bias)[0], dtype, scale=8.0)


def test_unfused_path_says_so_once_and_is_queryable():
    from amnets_kernels._ops import bsr
    bsr._unfused_warned.clear()
    w = sparse(4 * 8, 12 + 8)
    cell = ak.PreparedBsrLstmCell(w)
    x, h, c = rand(2, 12, device=DEVICE), rand(2, 8, device=DEVICE), rand(2, 8, device=DEVICE)
    with ak.use_backend("reference"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h1, _ = cell(x, h, c)
        cell(x, h, c)
    assert cell.last_path == "bsr_linear + pointwise"
    assert sum("no fused step kernel" in str(m.message) for m in caught) == 1
    close(h1, lstm_step_64(x, h, c, w, None)[0], torch.float32)


def test_gradients_flow_through_the_op_path():
    """A call that wants autograd goes through the public ops: the gradients of the float64 math."""
    w = sparse(4 * 10, 14 + 10)
    w.values.requires_grad_(True)
    bias = rand(40, device=DEVICE, requires_grad=True)
    x = rand(3, 14, device=DEVICE, requires_grad=True)
    h, c = rand(3, 10, device=DEVICE), rand(3, 10, device=DEVICE)
    out = ak.PreparedBsrLstmCell(w, bias)(x, h, c)
    got = grads(out, [x, bias])
    x64, b64 = x.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
    want = grads(lstm_step_64(x64, h, c, w, b64), [x64, b64])
    for g, e in zip(got, want):
        close(g, e, torch.float32)
    y = ak.PreparedBsrLinear(w, bias)(x.new_ones(2, 24).requires_grad_(True))
    assert y.requires_grad


def test_index_edited_in_place_is_checked_again():
    w = sparse(32, 48)
    lin = ak.PreparedBsrLinear(w)
    x = rand(2, 48, device=DEVICE)
    lin(x)
    w.col_indices[0] = 99  # outside the 3 block columns
    with pytest.raises(ValueError, match="col_indices"):
        lin(x)


def test_bad_input_is_named():
    w = sparse(4 * 8, 12 + 8)
    cell, lin = ak.PreparedBsrLstmCell(w), ak.PreparedBsrLinear(w)
    x, h, c = rand(2, 12, device=DEVICE), rand(2, 8, device=DEVICE), rand(2, 8, device=DEVICE)
    with pytest.raises(TypeError, match="weight must be an amnets_kernels.BlockSparseMatrix"):
        ak.PreparedBsrLinear(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        lin(rand(2, 13, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lin([1.0] * 20)
    with pytest.raises(TypeError, match="x must be torch.float32"):
        lin(rand(2, 20, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 8\)"):
        cell(x, rand(3, 8, device=DEVICE), c)
    with pytest.raises(ValueError, match="c must have shape"):
        cell(x, h, rand(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="x must be 2-D"):
        cell(x[None], h, c)
    with pytest.raises(ValueError, match=r"weight must be \[W_ih \| W_hh\]"):
        ak.PreparedBsrLstmCell(sparse(30, 40))
    with pytest.raises(ValueError, match="bias must have shape"):
        ak.PreparedBsrLinear(w, rand(7, device=DEVICE))
    with pytest.raises(TypeError, match="weight's bias has dtype torch.float64 but its values torch.float32"):
        ak.PreparedBsrLinear(w, rand(4 * 8, dtype=torch.float64, device=DEVICE))  # (not "x", which it has none of)
    u = rand(32, 4, device=DEVICE)
    with pytest.raises(ValueError, match="w_ih_v"):
        ak.PreparedLowrankLstmCell(u, rand(5, 12, device=DEVICE), u, rand(4, 8, device=DEVICE))
    lowrank = ak.PreparedLowrankLstmCell(u, rand(4, 12, device=DEVICE), u, rand(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="h must have shape"):
        lowrank(x, rand(2, 7, device=DEVICE), c)
