"""bsr_linear: every face against dense math on the same pruned weight; formats; bad input."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix
from amnets_kernels.formats import block_row_of

from conftest import DEVICE, FACES, use_face
from helpers import close, grads, rand

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make(out_f, in_f, block, sparsity, dtype=torch.float32, device=DEVICE):
    w = rand(out_f, in_f, dtype=dtype, device=device)
    return w, BlockSparseMatrix.from_dense(w, block_size=block, sparsity=sparsity)


def dense_linear(x, sparse, bias):
    """The independent answer: F.linear on the densified weight, computed in float64."""
    y = F.linear(x.double(), sparse.to_dense().double(), None if bias is None else bias.double())
    return y


@pytest.mark.parametrize("face", FACES)
@given(m=st.integers(0, 100), out_f=st.integers(1, 140), in_f=st.integers(1, 140),  # 45+ rows: 48-row tiles
       block=st.sampled_from([1, 4, 16, 32, 64]), sparsity=st.sampled_from([0.0, 0.3, 0.75, 1.0]),
       dtype=st.sampled_from(DTYPES), has_bias=st.booleans(), lead=st.sampled_from([(), (2,), (2, 1)]))
def test_forward_and_grads_match_dense(face, m, out_f, in_f, block, sparsity, dtype, has_bias, lead):
    with use_face("bsr_linear", face):
        w, sparse = make(out_f, in_f, block, sparsity, dtype)
        sparse.values.requires_grad_(True)
        x = rand(*lead, m, in_f, dtype=dtype, device=DEVICE, requires_grad=True)
        bias = rand(out_f, dtype=dtype, device=DEVICE, requires_grad=True) if has_bias else None
        y = ak.bsr_linear(x, sparse, bias)
        assert y.shape == (*lead, m, out_f) and y.dtype == dtype
        close(y, dense_linear(x, sparse, bias), dtype, scale=in_f ** 0.5)
        # Gradients: dense autograd on the padded block grid, read back at the stored blocks only.
        gx, gv, gb = grads(y, [x, sparse.values, bias])
        dense_w = sparse.to_dense().double().requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        b64 = None if bias is None else bias.detach().double().requires_grad_(True)
        ex, ew, eb = grads(F.linear(x64, dense_w, b64), [x64, dense_w, b64])
        close(gx, ex, dtype, scale=out_f ** 0.5)
        expected_values = BlockSparseMatrix.from_block_mask(ew, sparse.block_mask(), block).values
        close(gv, expected_values, dtype, scale=max(m, 1) ** 0.5)
        if bias is not None:
            close(gb, eb, dtype, scale=max(m, 1) ** 0.5)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 40, 45, 64, 77, 100])  # from 45 rows the fp32 kernel's 48-row tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_tiles_and_poisoned_padding(face, block, m, dtype):
    """Shapes that are not whole blocks, row counts on both sides of every kernel's tile size, and
    block entries outside the logical matrix holding inf/NaN: they must never reach the result."""
    with use_face("bsr_linear", face):
        out_f, in_f = 3 * block + 5, 2 * block + 7
        _, clean = make(out_f, in_f, block, 0.4, dtype)
        values = clean.values.detach().clone()
        rows, cols = block_row_of(clean.crow_indices), clean.col_indices.long()
        values[rows == out_f // block, out_f % block:, :] = float("nan")  # rows past out_features
        values[cols == in_f // block, :, in_f % block:] = float("inf")  # columns past in_features
        dirty = BlockSparseMatrix(values.requires_grad_(True), clean.crow_indices, clean.col_indices, clean.shape)
        x = rand(m, in_f, dtype=dtype, device=DEVICE, requires_grad=True)
        y = ak.bsr_linear(x, dirty)
        assert torch.isfinite(y).all()
        close(y, dense_linear(x, clean, None), dtype, scale=in_f ** 0.5)
        gx, gv = grads(y, [x, dirty.values])
        x64 = x.detach().double().requires_grad_(True)
        dense_w = clean.to_dense().double().requires_grad_(True)
        ex, ew = grads(F.linear(x64, dense_w), [x64, dense_w])
        close(gx, ex, dtype, scale=out_f ** 0.5)
        close(gv, BlockSparseMatrix.from_block_mask(ew, clean.block_mask(), block).values, dtype, scale=m ** 0.5)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("m", [1, 2, 5, 9, 16])
def test_widths_and_alignments_that_change_kernel_paths(face, m):
    """K a multiple of 8 but not of the block (no x padding copy needed), values and x as views that
    start one element into their storage (not 16-byte aligned): all must equal dense math."""
    with use_face("bsr_linear", face):
        block = 32
        out_f, in_f = 2 * block + 3, 2 * block + 8
        _, clean = make(out_f, in_f, block, 0.5)
        values = clean.values.detach().clone()
        values[clean.col_indices.long() == in_f // block, :, in_f % block:] = float("inf")  # poisoned padding
        storage = torch.empty(values.numel() + 1, device=DEVICE)
        shifted = storage[1:].view_as(values).copy_(values)  # misaligned by 4 bytes
        sparse = BlockSparseMatrix(shifted, clean.crow_indices, clean.col_indices, clean.shape)
        x_storage = torch.randn(m * in_f + 1, device=DEVICE)
        x = x_storage[1:].view(m, in_f)
        y = ak.bsr_linear(x, sparse)
        assert y.shape == (m, out_f) and torch.isfinite(y).all()  # the inf in the padding never leaks
        close(y, dense_linear(x, clean, None), torch.float32, scale=in_f ** 0.5)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA face's few-row kernel")
@pytest.mark.parametrize("split", ["off", "on", "auto"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_few_rows_with_blocks_split_over_warps(monkeypatch, split, block, m, dtype):
    """AMNETS_BSR_CUDA_SPLIT: each block row's blocks spread over a CTA's 4 warps, partial sums met in shared
    memory. Block rows with 0, 1, 3 (fewer than the warps), 4 and 9 stored blocks, partial last block row and
    column with poisoned padding, a bias: dense math, finite, and the same bits on a second call."""
    monkeypatch.setenv("AMNETS_BSR_CUDA_SPLIT", split)
    with use_face("bsr_linear", "cuda"):
        out_f, in_f = 5 * block - 3, 9 * block + 5
        counts = [0, 1, 3, 4, 9]
        mask = torch.zeros(5, 10, dtype=torch.bool)
        for r, count in enumerate(counts):
            mask[r, torch.randperm(10)[:count]] = True
        clean = BlockSparseMatrix.from_block_mask(rand(out_f, in_f, dtype=dtype, device=DEVICE), mask.to(DEVICE),
                                                  block)
        values = clean.values.detach().clone()
        rows, cols = block_row_of(clean.crow_indices), clean.col_indices.long()
        values[rows == out_f // block, out_f % block:, :] = float("nan")  # rows past out_features
        values[cols == in_f // block, :, in_f % block:] = float("inf")  # columns past in_features
        dirty = BlockSparseMatrix(values, clean.crow_indices, clean.col_indices, clean.shape)
        x, bias = rand(m, in_f, dtype=dtype, device=DEVICE), rand(out_f, dtype=dtype, device=DEVICE)
        y = ak.bsr_linear(x, dirty, bias)
        assert torch.isfinite(y).all() and torch.equal(y, ak.bsr_linear(x, dirty, bias))
        close(y, dense_linear(x, clean, bias), dtype, scale=in_f ** 0.5)
        monkeypatch.setenv("AMNETS_BSR_CUDA_SPLIT", "sometimes")
        with pytest.raises(ValueError, match="AMNETS_BSR_CUDA_SPLIT must be off, on or auto; got 'sometimes'"):
            ak.bsr_linear(x, dirty, bias)


@pytest.mark.parametrize("face", FACES)
def test_non_contiguous_and_all_zero(face):
    with use_face("bsr_linear", face):
        w, sparse = make(40, 24, 8, 1.0)
        assert sparse.nnzb == 0
        x = rand(24, 5, device=DEVICE).T  # non-contiguous rows
        bias = rand(40, device=DEVICE)
        close(ak.bsr_linear(x, sparse, bias), bias.expand(5, 40).double(), torch.float32)
        _, sparse = make(40, 24, 8, 0.5)
        close(ak.bsr_linear(x, sparse), dense_linear(x, sparse, None), torch.float32)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 70])  # from 64 rows the SDDMM packs x and grad_y
def test_cpu_bf16_weight_gradient_is_the_fp32_one_rounded(block, m):
    """The CPU kernels accumulate in fp32 whatever the weights' dtype, so bf16 grad_values must be the fp32
    kernel's result on the same (bf16-valued) inputs rounded to nearest even, bit for bit; NaN stays NaN and
    overflow becomes inf (the vectorised store must round as torch does)."""
    if DEVICE != "cpu" or ak.unavailable_reason("bsr_linear", "cpu") is not None:
        pytest.skip("cpu face only")
    out_f, in_f = 4 * block + 3, 3 * block + 5
    _, sparse = make(out_f, in_f, block, 0.5)
    sparse = sparse.to(torch.bfloat16)
    x = (rand(m, in_f) * 1e3).to(torch.bfloat16)
    gy = (rand(m, out_f) * 1e35).to(torch.bfloat16)  # products past bf16's range: inf, and inf - inf = NaN
    gy[0, 0] = float("nan")
    from amnets_kernels import _backend

    backward = torch.ops.amnets_native.bsr_linear_backward
    args = (sparse.crow_indices, sparse.col_indices, out_f, in_f, False, True)
    _backend._C.set_cpu_amx("off")  # the vector kernels' rounding (AMX tiles sum in another order: below)
    try:
        got = backward(gy, x, sparse.values, *args)[1]
    finally:
        _backend._C.set_cpu_amx("auto")
    want = backward(gy.float(), x.float(), sparse.values.float(), *args)[1].to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.isnan(), want.isnan())
    assert want.isinf().any() and want.isnan().any()
    keep = ~want.isnan()
    assert torch.equal(got.view(torch.int16)[keep], want.view(torch.int16)[keep])


@pytest.mark.parametrize("kernel", ["emulate", "hardware"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("m", [8, 21, 24, 25, 48, 53])
def test_cpu_bf16_amx_tiles(kernel, block, m):
    """bf16 weights' tile kernels on AMX (csrc/cpu/amx.h: the forward from 8 rows, grad_x and grad_values from
    24) against the fp32 kernels on the same bf16-valued inputs: both sum exact products in fp32, so once
    rounded to bf16 they differ by at most one bf16 step (the order of the sums). Shapes that are not whole
    blocks and inf/NaN in the padding, as above.
    'emulate' runs the kernel's tile program on the scalar emulation of AMX, on any CPU (its asserts fail
    on a tile shape the hardware would fault on); 'hardware' needs a CPU and OS with AMX."""
    from amnets_kernels import _backend

    if DEVICE != "cpu" or ak.unavailable_reason("bsr_linear", "cpu") is not None:
        pytest.skip("cpu face only")
    if kernel == "hardware" and ak.build_info()["cpu_bf16_bsr_kernel"] != "amx tiles":
        pytest.skip("no AMX on this CPU (or the OS does not grant it)")
    out_f, in_f = 3 * block + 5, 4 * block + 7
    _, clean = make(out_f, in_f, block, 0.4)
    values = clean.values.detach().clone()
    rows, cols = block_row_of(clean.crow_indices), clean.col_indices.long()
    values[rows == out_f // block, out_f % block:, :] = float("nan")
    values[cols == in_f // block, :, in_f % block:] = float("inf")
    values = values.to(torch.bfloat16)
    x = rand(m, in_f).to(torch.bfloat16)
    forward = torch.ops.amnets_native.bsr_linear_forward
    args = (clean.crow_indices, clean.col_indices, out_f, in_f, None)
    gy = rand(m, out_f).to(torch.bfloat16)
    backward = torch.ops.amnets_native.bsr_linear_backward
    bargs = (clean.crow_indices, clean.col_indices, out_f, in_f, True, True)
    want = forward(x.float(), values.float(), *args)
    want_gx, want_gv = backward(gy.float(), x.float(), values.float(), *bargs)
    if kernel == "emulate":
        _backend._C.set_cpu_amx("emulate")
        assert ak.build_info()["cpu_bf16_bsr_kernel"] == "amx tiles, emulated (tests only)"
    try:
        got = forward(x, values, *args)
        got_gx, got_gv = backward(gy, x, values, *bargs)  # on the tiles from 24 rows
    finally:
        _backend._C.set_cpu_amx("auto")
    for g, w, depth in ((got, want, in_f), (got_gx, want_gx, out_f), (got_gv, want_gv, m)):
        assert g.dtype == torch.bfloat16 and torch.isfinite(w).all()
        step = w.abs() * 2.0 ** -7 + 1e-5 * depth  # one bf16 step, plus fp32 sums in another order
        assert ((g.float() - w).abs() <= step).all()


@given(m=st.integers(8, 70), out_f=st.integers(1, 140), in_f=st.integers(1, 140),
       block=st.sampled_from([16, 32, 64]), sparsity=st.sampled_from([0.0, 0.5, 1.0]))
def test_cpu_bf16_amx_tiles_on_any_shape(m, out_f, in_f, block, sparsity):
    """The AMX tile kernels (emulated; see above) on generated shapes: narrower than a block, empty patterns,
    partial tiles everywhere; forward and both gradients within a bf16 step of the fp32 kernels."""
    from amnets_kernels import _backend

    if DEVICE != "cpu" or ak.unavailable_reason("bsr_linear", "cpu") is not None:
        pytest.skip("cpu face only")
    _, sparse = make(out_f, in_f, block, sparsity)
    values, x, gy = sparse.values.bfloat16(), rand(m, in_f).bfloat16(), rand(m, out_f).bfloat16()
    pattern = (sparse.crow_indices, sparse.col_indices, out_f, in_f)
    forward, backward = torch.ops.amnets_native.bsr_linear_forward, torch.ops.amnets_native.bsr_linear_backward
    want = (forward(x.float(), values.float(), *pattern, None),
            *backward(gy.float(), x.float(), values.float(), *pattern, True, True))
    _backend._C.set_cpu_amx("emulate")
    try:
        got = (forward(x, values, *pattern, None), *backward(gy, x, values, *pattern, True, True))
    finally:
        _backend._C.set_cpu_amx("auto")
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.bfloat16
        assert ((g.float() - w).abs() <= w.abs() * 2.0 ** -7 + 1e-5 * max(m, in_f, out_f)).all()


def test_cpu_face_says_when_it_has_no_simd_kernel():
    """Block sizes outside {16, 32, 64} (or fp16/fp64 values) run exact dense math, and say so
    (once per process, so in a fresh one)."""
    if ak.unavailable_reason("bsr_linear", "cpu") is not None:
        pytest.skip("no cpu face")
    code = ("import torch, warnings, amnets_kernels as ak\n"
            "m = ak.BlockSparseMatrix.from_dense(torch.randn(12, 12), block_size=4, sparsity=0.5)\n"
            "half = ak.BlockSparseMatrix.from_dense(torch.randn(32, 32).half(), block_size=16, sparsity=0.5)\n"
            "layer = ak.nn.BlockSparseLinear(24, 24, block_size=8, sparsity=0.5)\n"
            "with ak.use_backend('cpu'), warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    y = ak.bsr_linear(torch.ones(2, 12), m)\n"
            "    ak.bsr_linear(torch.ones(2, 32).half(), half)\n"
            "    layer(torch.ones(2, 24)), layer(torch.ones(2, 24))\n"
            "assert torch.allclose(y, torch.ones(2, 12) @ m.to_dense().T, atol=1e-5)\n"
            "print([str(x.message) for x in w])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "no SIMD kernel for block size 4" in out
    # fp16 (the cpu face has no fp16 kernel; the CUDA face's fp16 kept it quiet) and the module, once
    assert "no SIMD kernel for dtype torch.float16 (fast: block sizes 16, 32, 64" in out
    assert out.count("no SIMD kernel for block size 8") == 1


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("block, dtype", [(16, torch.float32), (32, torch.float32), (8, torch.float32),
                                          (16, torch.float64)])
def test_non_finite_input_reaches_exactly_the_outputs_of_stored_blocks(face, block, dtype):
    """Absent blocks are structural zeros on every face: a NaN/inf in x reaches the outputs of the block rows
    that store a block over its column, all of those and no others (0 * NaN is never formed); the same for a
    NaN in grad_y and grad_x. Padding past the logical matrix holds NaN too and must not leak. Block 8 and
    float64 are the cpu face's generic path (dense math: it spread a NaN into every output)."""
    with use_face("bsr_linear", face):
        out_f, in_f = 3 * block - 5, 3 * block - 3
        mask = torch.tensor([[True, False, True], [False, False, True], [True, True, False]])
        w = BlockSparseMatrix.from_block_mask(rand(out_f, in_f, dtype=dtype, device=DEVICE), mask.to(DEVICE), block)
        values = w.values.detach().clone()
        rows, cols = block_row_of(w.crow_indices), w.col_indices.long()
        values[rows == 2, out_f % block:] = float("nan")  # rows past out_features
        values[cols == 2, :, in_f % block:] = float("nan")  # columns past in_features
        w = BlockSparseMatrix(values, w.crow_indices, w.col_indices, w.shape)
        x = rand(4, in_f, dtype=dtype, device=DEVICE).requires_grad_(True)
        poisoned = x.detach().clone()
        for row, column_block in enumerate((0, 1, 2)):  # row 3 stays finite
            poisoned[row, column_block * block + 1] = float("nan") if row % 2 else float("inf")
        y = ak.bsr_linear(poisoned.requires_grad_(True), w)
        bad = ~torch.isfinite(y)
        for row, column_block in enumerate((0, 1, 2, None)):
            for row_block in range(3):
                reached = column_block is not None and bool(mask[row_block, column_block])
                assert bad[row, row_block * block:(row_block + 1) * block].any().item() == reached, (row, row_block)
        g = torch.zeros(4, out_f, dtype=dtype, device=DEVICE)
        g[0, block + 2] = float("nan")  # block row 1 stores only block column 2
        gx, = torch.autograd.grad(ak.bsr_linear(x, w), x, g)
        bad_columns = (~torch.isfinite(gx[0])).cpu()
        assert bad_columns[2 * block:].all() and not bad_columns[:2 * block].any()
        assert torch.isfinite(gx[1:]).all()


def test_reference_face_in_row_chunks_equals_one_pass(monkeypatch):
    """The reference gathers x's blocks a few rows at a time to bound its memory: chunked = one pass."""
    from amnets_kernels.reference import bsr as reference

    _, sparse = make(40, 50, 16, 0.5, device="cpu")
    x, g = rand(7, 50), rand(7, 40)
    args = (sparse.values, sparse.crow_indices, sparse.col_indices, 40, 50)
    whole = reference.bsr_linear_forward(x, *args, None), *reference.bsr_linear_backward(g, x, *args, True, True)
    monkeypatch.setattr(reference, "_GATHER_ELEMENTS", 1)  # one row per einsum
    chunked = reference.bsr_linear_forward(x, *args, None), *reference.bsr_linear_backward(g, x, *args, True, True)
    assert len(chunked) == len(whole) == 3
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)


def densified(values, sparse):
    """The dense matrix of `values` at `sparse`'s pattern, differentiable in `values`."""
    (out_f, in_f), b = sparse.shape, sparse.block_size
    rows, cols = block_row_of(sparse.crow_indices).long(), sparse.col_indices.long()
    grid = torch.zeros(-(-out_f // b), -(-in_f // b), b, b, dtype=values.dtype, device=values.device)
    grid = grid.index_put((rows, cols), values)
    return grid.permute(0, 2, 1, 3).reshape(grid.shape[0] * b, grid.shape[1] * b)[:out_f, :in_f]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("m, out_f, in_f, block", [(3, 40, 24, 8), (1, 70, 33, 16), (17, 64, 64, 32), (0, 16, 16, 16)])
def test_double_backward_matches_dense(face, m, out_f, in_f, block):
    """Second derivatives (a Hessian-vector product of a non-linear loss, in x and in values) equal dense
    autograd's on the densified weight; and a third order runs (the double backward records a graph too)."""
    with use_face("bsr_linear", face):
        _, sparse = make(out_f, in_f, block, 0.5)
        x0, v0 = rand(m, in_f, device=DEVICE), sparse.values.detach()
        probe_x, probe_v, probe_g = rand(m, in_f, device=DEVICE), rand(*v0.shape, device=DEVICE), rand(m, out_f, device=DEVICE)

        def second(linear, x, v):
            y = linear(x, v)
            gx, gv = torch.autograd.grad((y.tanh() * probe_g).sum(), (x, v), create_graph=True)
            return torch.autograd.grad((gx * probe_x).sum() + (gv * probe_v).sum(), (x, v), create_graph=True)

        ours = [x0.clone().requires_grad_(True), v0.clone().requires_grad_(True)]
        hx, hv = second(lambda x, v: ak.bsr_linear(x, BlockSparseMatrix(v, sparse.crow_indices, sparse.col_indices,
                                                                         sparse.shape)), *ours)
        dense = [x0.double().requires_grad_(True), v0.double().requires_grad_(True)]
        ex, ev = second(lambda x, v: F.linear(x, densified(v, sparse)), *dense)
        close(hx, ex, torch.float32, scale=out_f)
        close(hv, ev, torch.float32, scale=max(m, 1))
        if m:
            third, = torch.autograd.grad((hx.sum() + hv.sum()), ours[0])
            expected, = torch.autograd.grad((ex.sum() + ev.sum()), dense[0])
            close(third, expected, torch.float32, scale=4 * float(expected.abs().max()))  # fp32, three chained products


def test_reference_gradcheck_float64():
    with ak.use_backend("reference"):
        _, sparse = make(10, 13, 4, 0.4, torch.float64, device="cpu")  # the reference's own check: any device
        x = rand(3, 13, dtype=torch.float64, requires_grad=True)
        bias = rand(10, dtype=torch.float64, requires_grad=True)
        values = sparse.values.requires_grad_(True)
        fn = lambda x, v, b: torch.ops.amnets.bsr_linear(x, v, sparse.crow_indices, sparse.col_indices, 10, 13, b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, values, bias))
        assert torch.autograd.gradgradcheck(fn, (x, values, bias))


def test_opcheck_and_compile():
    with ak.use_backend("reference"):
        _, sparse = make(20, 12, 4, 0.5, device="cpu")  # schema and tracing checks: any device
        x = rand(3, 12, requires_grad=True)
        bias = rand(20, requires_grad=True)
        values = sparse.values.requires_grad_(True)
        args = (x, values, sparse.crow_indices, sparse.col_indices, 20, 12, bias)
        torch.library.opcheck(torch.ops.amnets.bsr_linear_forward.default, args)
        torch.library.opcheck(torch.ops.amnets.bsr_linear.default, (rand(2, 3, 12, requires_grad=True), *args[1:]))
        grad_out = rand(3, 20)
        torch.library.opcheck(torch.ops.amnets.bsr_linear_backward.default,
                              (grad_out, x.detach(), values.detach(), sparse.crow_indices, sparse.col_indices,
                               20, 12, True, True))

        def f(x, values, bias):
            return torch.ops.amnets.bsr_linear(x, values, sparse.crow_indices, sparse.col_indices, 20, 12, bias).sin()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y, y_eager = compiled(x, values, bias), f(x, values, bias)
        close(y, y_eager)
        close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(y_eager.sum(), x)[0])


# ---------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument


@pytest.fixture
def good():
    _, sparse = make(20, 12, 4, 0.5, device="cpu")
    return sparse


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(x=torch.zeros(3, 11)), ValueError, r"x\.shape\[-1\] must equal in_features = 12"),
    (lambda a: a.update(x=torch.zeros(3, 12, dtype=torch.int64)), TypeError, r"x must have dtype"),
    (lambda a: a.update(x=torch.zeros(3, 12, dtype=torch.float64)), TypeError, r"values has dtype"),
    (lambda a: a.update(bias=torch.zeros(19)), ValueError, r"bias must have shape \(out_features,\) = \(20,\)"),
    (lambda a: a.update(x=[[1.0] * 12]), TypeError, r"x must be a torch.Tensor; got list"),
])
def test_bad_arguments(good, mutate, error, match):
    args = dict(x=torch.zeros(3, 12), bias=None)
    mutate(args)
    with ak.use_backend("reference"), pytest.raises(error, match=match):
        ak.bsr_linear(args["x"], good, args["bias"])


@pytest.mark.parametrize("crow, col, match", [
    ([1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2], r"crow_indices\[0\] must be 0"),
    ([0, 2, 1, 4, 5, 6], [0, 1, 2, 0, 1, 2], r"crow_indices must be non-decreasing"),
    ([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2], r"crow_indices\[-1\] must equal the number of blocks"),
    ([0, 1, 2, 3, 4, 6], [0, 1, 2, 0, 1, 3], r"col_indices must lie in \[0, 3\)"),
    ([0, 1, 2, 3, 4, 6], [0, 1, 2, 0, 1, -1], r"col_indices must lie in \[0, 3\)"),
    ([0, 1, 2, 3, 4, 6], [0, 1, 2, 0, 2, 2], r"strictly increasing within each block row; block row 4"),
    ([0, 1, 2, 3, 6], [0, 1, 2, 0, 1, 2], r"crow_indices must have shape"),
])
def test_inconsistent_indices_rejected(crow, col, match):
    values = torch.zeros(len(col), 4, 4)
    crow_t, col_t = torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        BlockSparseMatrix(values, crow_t, col_t, (20, 12))
    with ak.use_backend("reference"), pytest.raises(ValueError, match=match):  # the raw op checks too
        torch.ops.amnets.bsr_linear(torch.zeros(2, 12), values, crow_t, col_t, 20, 12, None)


def test_index_check_is_cached_and_sees_mutation(good):
    with ak.use_backend("reference"):
        ak.bsr_linear(torch.zeros(1, 12), good)
        good.col_indices[0] = 7  # in-place change bumps the version: checked again
        with pytest.raises(ValueError, match="col_indices must lie"):
            ak.bsr_linear(torch.zeros(1, 12), good)


def test_weight_must_be_block_sparse_matrix():
    with pytest.raises(TypeError, match="weight must be an amnets_kernels.BlockSparseMatrix"):
        ak.bsr_linear(torch.zeros(2, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("face", FACES)
@given(data=st.data())
def test_fuzz_never_crashes(face, data):
    """Random shapes and dtypes mixed badly: a TypeError/ValueError or a right answer, nothing else."""
    with use_face("bsr_linear", face):
        out_f, in_f, block = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 4))
        _, sparse = make(out_f, in_f, block, data.draw(st.sampled_from([0.0, 0.5])))
        x_shape = data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        x_dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.int32]))
        x = torch.zeros(x_shape, dtype=x_dtype, device=DEVICE)
        bias = data.draw(st.sampled_from([None, torch.zeros(out_f, device=DEVICE), torch.zeros(out_f + 1, device=DEVICE)]))
        try:
            y = ak.bsr_linear(x, sparse, bias)
        except (TypeError, ValueError) as exc:
            assert "bsr_linear" in str(exc)
        else:
            close(y, dense_linear(x, sparse, bias), torch.float32)
