"""bf16 weights on a CPU without AVX512-BF16 or AMX (AVX2 / AVX-512F machines: AMD EPYC before Zen 4, Intel Xeon
before Cooper Lake). `_C.set_cpu_dpbf16("off")` with `set_cpu_amx("off")` runs the CPU kernels as they run there,
on any CPU: every bf16 path a user reaches works (no error, no instruction the CPU lacks) and gives what the fp32
kernels give on the same bf16 values, up to the roundings of bf16 outputs."""

import pytest
import torch

import amnets_kernels as ak
from amnets.encoder import AmNetsEncoder
from amnets_kernels import _backend

from conftest import DEVICE

if DEVICE != "cpu" or ak.unavailable_reason("bsr_linear", "cpu") is not None:
    pytest.skip("the cpu face's kernels", allow_module_level=True)


@pytest.fixture
def without_bf16_instructions():
    _backend._C.set_cpu_dpbf16("off")
    _backend._C.set_cpu_amx("off")
    try:
        yield
    finally:
        _backend._C.set_cpu_dpbf16("auto")
        _backend._C.set_cpu_amx("auto")


def test_build_info_says_which_kernels_run(without_bf16_instructions):
    info = ak.build_info()
    assert info["cpu_bf16_bsr_kernel"] == "bf16 widened to fp32 FMAs"
    assert not info["cpu_bf16_lowrank_lstm_kernel"].startswith("avx512_bf16")
    with pytest.raises(ValueError, match="set_cpu_dpbf16: mode must be 'auto' or 'off'; got 'on'"):
        _backend._C.set_cpu_dpbf16("on")


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 70])
def test_bsr_linear_is_the_fp32_kernel_rounded(block, m, without_bf16_instructions):
    """Forward and both gradients: the fp32 kernels' sums on the bf16 values, rounded to bf16 once."""
    torch.manual_seed(m)
    out_f, in_f = 3 * block + 5, 4 * block + 7
    sparse = ak.BlockSparseMatrix.from_dense(torch.randn(out_f, in_f), block, sparsity=0.5).to(torch.bfloat16)
    x, gy = torch.randn(m, in_f).bfloat16(), torch.randn(m, out_f).bfloat16()
    forward, backward = torch.ops.amnets_native.bsr_linear_forward, torch.ops.amnets_native.bsr_linear_backward
    pattern = (sparse.crow_indices, sparse.col_indices, out_f, in_f)
    got = [forward(x, sparse.values, *pattern, None), *backward(gy, x, sparse.values, *pattern, True, True)]
    want = [forward(x.float(), sparse.values.float(), *pattern, None),
            *backward(gy.float(), x.float(), sparse.values.float(), *pattern, True, True)]
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.bfloat16().float(), rtol=2 ** -7, atol=1e-5 * in_f)


@pytest.mark.parametrize("proj", [0, 8])
def test_block_sparse_lstm(proj, without_bf16_instructions):
    """With nn.LSTM's projection too, whose bf16 product needed AVX512-BF16 (a TypeError before)."""
    torch.manual_seed(proj)
    lstm = torch.nn.LSTM(24, 32, num_layers=2, batch_first=True, proj_size=proj)
    model = ak.nn.BlockSparseLSTM.from_lstm(lstm, block_size=16, sparsity=0.5).eval()
    x = torch.randn(3, 5, 24).bfloat16()
    with torch.no_grad():
        want = model(x.float())[0]
        got = model.bfloat16()(x)[0]
        steps = [model(x[:, :1])[0]]  # one frame a call, as a stream runs
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03)
    torch.testing.assert_close(steps[0], got[:, :1])


def test_lowrank_lstm(without_bf16_instructions):
    torch.manual_seed(1)
    model = ak.nn.LowRankLSTM.from_lstm(torch.nn.LSTM(24, 32, num_layers=2, batch_first=True), rank=8).eval()
    x = torch.randn(3, 5, 24).bfloat16()
    with torch.no_grad():
        want = model(x.float())[0]
        got = model.bfloat16()(x)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_amnets_encoder_streams(cheap, without_bf16_instructions):
    """The frame engine built here packs its bf16 layers for the widening kernels (no vdpbf16ps pairs)."""
    torch.manual_seed(2)
    enc = AmNetsEncoder(24, 32, num_layers=2, cheap=cheap, sparsity=0.5, block_size=16, rank=4).eval()
    x = torch.randn(2, 6, 24).bfloat16()
    for force in ("full", "cheap"):
        want = enc.float().stream(x.float(), force=force)[0]
        got, mid, _ = enc.bfloat16().stream(x[:, :3], force=force)
        rest = enc.stream(x[:, 3:], mid, force=force)[0]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(torch.cat([got, rest], 1).float(), want, rtol=0.05, atol=0.03)
