"""BlockSparseMatrix (pruning, masks, torch BSR interop) and low-rank factor helpers."""

import pytest
import torch
import torch.nn.utils.prune
from hypothesis import given
from hypothesis import strategies as st

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix
from amnets_kernels.formats import bsr_to_dense


@given(n=st.integers(1, 40), k=st.integers(1, 40), block=st.sampled_from([1, 3, 8, 16]),
       sparsity=st.floats(0, 1))
def test_magnitude_pruning_keeps_the_largest_blocks(n, k, block, sparsity):
    w = torch.randn(n, k)
    m = BlockSparseMatrix.from_dense(w, block_size=block, sparsity=sparsity)
    rows, cols = -(-n // block), -(-k // block)
    assert m.shape == (n, k) and m.block_size == block
    assert m.nnzb == round((1 - sparsity) * rows * cols)
    assert m.density == pytest.approx(m.nnzb / (rows * cols))
    dense = m.to_dense()
    keep = m.block_mask()
    padded = torch.nn.functional.pad(w, (0, cols * block - k, 0, rows * block - n))
    norms = padded.reshape(rows, block, cols, block).pow(2).sum((1, 3))
    if 0 < m.nnzb < rows * cols:
        assert norms[keep].min() >= norms[~keep].max()
    expected = (w * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k])
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)


def test_element_mask_from_torch_prune_round_trips_exactly():
    lin = torch.nn.Linear(20, 12)
    torch.nn.utils.prune.random_unstructured(lin, "weight", amount=0.9)
    m = BlockSparseMatrix.from_dense(lin.weight, block_size=4, mask=lin.weight_mask)
    torch.testing.assert_close(m.to_dense(), lin.weight.detach(), rtol=0, atol=0)
    assert m.nnzb < 15  # most 4x4 blocks of a 90%-pruned 12x20 weight are empty


def test_block_mask_and_errors():
    w = torch.randn(6, 10)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    m = BlockSparseMatrix.from_dense(w, block_size=4, mask=keep)
    assert torch.equal(m.block_mask(), keep)
    with pytest.raises(ValueError, match=r"mask must have shape \(Nb, Kb\) = \(2, 3\)"):
        BlockSparseMatrix.from_dense(w, block_size=4, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="give sparsity or mask, not both"):
        BlockSparseMatrix.from_dense(w, block_size=4, sparsity=0.5, mask=keep)
    with pytest.raises(ValueError, match=r"sparsity must be a float in \[0, 1\]"):
        BlockSparseMatrix.from_dense(w, block_size=4, sparsity=1.5)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockSparseMatrix.from_dense(w, block_size=0)


@given(n=st.integers(1, 30), k=st.integers(1, 30), block=st.sampled_from([2, 4, 8]), sparsity=st.floats(0, 1))
def test_torch_bsr_round_trip(n, k, block, sparsity):
    m = BlockSparseMatrix.from_dense(torch.randn(n, k), block_size=block, sparsity=sparsity)
    t = m.to_torch_bsr()
    assert t.layout == torch.sparse_bsr
    torch.testing.assert_close(t.to_dense()[:n, :k], m.to_dense(), rtol=0, atol=0)
    back = BlockSparseMatrix.from_torch_bsr(t, shape=(n, k))
    assert back.shape == (n, k)
    for a, b in ((back.values, m.values), (back.crow_indices, m.crow_indices), (back.col_indices, m.col_indices)):
        assert torch.equal(a, b)


def test_from_torch_bsr_of_torch_built_tensor():
    dense = torch.randn(8, 12)
    dense[:4, 4:8] = 0
    t = dense.to_sparse_bsr((4, 4))
    m = BlockSparseMatrix.from_torch_bsr(t)
    torch.testing.assert_close(m.to_dense(), dense, rtol=0, atol=0)
    with pytest.raises(TypeError, match="must be a torch.sparse_bsr tensor"):
        BlockSparseMatrix.from_torch_bsr(dense)


def test_lowrank_factors_and_rank_for_energy():
    u0, v0 = torch.randn(30, 5, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    w = u0 @ v0
    u, v = ak.lowrank_factors(w, 5)
    torch.testing.assert_close(u @ v, w)
    assert ak.rank_for_energy(w, 1.0) == 5
    assert ak.rank_for_energy(w, 1e-9) == 1
    s2 = torch.linalg.svdvals(w).pow(2)
    r = ak.rank_for_energy(w, 0.9)
    assert s2[:r].sum() / s2.sum() >= 0.9 > s2[: r - 1].sum() / s2.sum()
    with pytest.raises(ValueError, match=r"rank must be <= min\(weight.shape\) = 20"):
        ak.lowrank_factors(w, 21)


def test_a_matrix_moves_to_meta_and_back_to_real_shapes():
    dense = torch.randn(20, 12)
    on_meta = BlockSparseMatrix.from_dense(dense, block_size=4, sparsity=0.5).to("meta")
    assert on_meta.device.type == "meta" and on_meta.crow_indices.device.type == "meta"
    assert on_meta.shape == (20, 12) and on_meta.nnzb == 8  # 15 blocks, half kept: round(7.5) = 8
    for backend in ("auto", "cpu"):  # shape inference, under any backend, whatever the block size's kernels
        with ak.use_backend(backend):  # (block 4 under "cpu" raised: the no-fast-kernel note asked for a face)
            assert ak.bsr_linear(torch.empty(3, 12, device="meta"), on_meta).shape == (3, 20)


def test_modules_built_on_meta_take_their_pattern_from_a_checkpoint():
    """Built on meta (device="meta" or under `with torch.device("meta")`, as large models are), a block-sparse
    module has the shapes its pruning keeps and no pattern; load_state_dict(..., assign=True) brings one. It
    raised before ("a meta tensor does not hold" the norms to prune by)."""
    torch.manual_seed(0)
    on_meta = ak.nn.BlockSparseLinear(64, 96, block_size=16, sparsity=0.5, device="meta")
    assert on_meta.values.shape == (12, 16, 16) and on_meta.crow_indices.shape == (7,)  # round(0.5 * 24) blocks
    assert on_meta(torch.empty(2, 64, device="meta")).shape == (2, 96)  # shape inference
    real = ak.nn.BlockSparseLinear(64, 96, block_size=16, sparsity=0.5)
    on_meta.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(on_meta(x), real(x))
    with torch.device("meta"):
        lstm = ak.nn.BlockSparseLSTM(32, 16, block_size=16)
    real_lstm = ak.nn.BlockSparseLSTM(32, 16, block_size=16)
    lstm.load_state_dict(real_lstm.state_dict(), assign=True)
    seq = torch.randn(5, 2, 32)
    assert torch.equal(lstm(seq)[0], real_lstm(seq)[0])
    # to_empty() without a checkpoint leaves an uninitialised pattern: refused by the checks, never read blindly
    # (the sizes are kept, so a pattern of zeros, say, fails crow_indices[-1] = nnzb)
    empty = ak.nn.BlockSparseLinear(64, 96, block_size=16, sparsity=0.5, device="meta").to_empty(device="cpu")
    empty.crow_indices.zero_()
    with pytest.raises(ValueError, match="crow_indices"):
        empty(x)


def test_indices_must_be_integers_that_fit_int32():
    good = BlockSparseMatrix.from_dense(torch.randn(16, 16), block_size=8, sparsity=0.0)
    with pytest.raises(TypeError, match="col_indices must have dtype in \\(int32, int64\\)"):
        BlockSparseMatrix(good.values, good.crow_indices, good.col_indices.float(), (16, 16))
    with pytest.raises(ValueError, match="crow_indices"):  # 2^32 + k would wrap to k in int32
        BlockSparseMatrix(good.values, good.crow_indices.long() + 2**32, good.col_indices.long(), (16, 16))
    mixed = BlockSparseMatrix(good.values, good.crow_indices.long(), good.col_indices, (16, 16))
    assert mixed.crow_indices.dtype == mixed.col_indices.dtype == torch.int32


def test_rank_for_energy_of_a_zero_matrix_is_one():
    from amnets_kernels.formats import rank_for_energy
    assert rank_for_energy(torch.zeros(8, 8), 0.9) == 1


def test_rank_for_energy_at_extreme_magnitudes_and_bad_arguments():
    """Singular values are scaled before they are squared: 1e200^2 would overflow, 1e-200^2 vanish."""
    big = torch.diag(torch.tensor([1e200, 1e199, 1e150, 1.0], dtype=torch.float64))
    assert ak.rank_for_energy(big, 0.5) == 1 and ak.rank_for_energy(big, 0.995) == 2
    assert ak.rank_for_energy(torch.eye(4, dtype=torch.float64) * 1e-200, 1.0) == 4
    with pytest.raises(ValueError, match="weight must be finite"):
        ak.rank_for_energy(torch.full((4, 4), float("inf")), 0.9)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ak.rank_for_energy(torch.randn(4), 0.9)
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        ak.rank_for_energy(torch.randn(4, 4), "0.5")
    for decompose in (lambda w: ak.rank_for_energy(w, 0.9), lambda w: ak.lowrank_factors(w, 1)):
        for shape in ((0, 5), (5, 0)):  # was an IndexError from the empty singular values
            with pytest.raises(ValueError, match=r"weight must be non-empty; got shape"):
                decompose(torch.zeros(shape))
        with pytest.raises(ValueError, match="weight is on the meta device"):  # was Tensor.item()'s RuntimeError
            decompose(torch.empty(8, 4, device="meta"))


def test_construction_errors_name_the_argument():
    w = torch.randn(8, 12)
    good = BlockSparseMatrix.from_dense(w, block_size=4, sparsity=0.5)
    with pytest.raises(TypeError, match=r"BlockSparseMatrix: values must have dtype"):
        BlockSparseMatrix(good.values.int(), good.crow_indices, good.col_indices, good.shape)
    with pytest.raises(TypeError, match=r"BlockSparseMatrix: values must have dtype"):
        good.to(torch.int32)
    with pytest.raises(ValueError, match=r"shape must be \(out_features, in_features\), two ints >= 1"):
        BlockSparseMatrix(good.values, good.crow_indices, good.col_indices, (0, 12))
    with pytest.raises(TypeError, match=r"keep must have dtype in \(bool\)"):  # a float mask summed fractions
        BlockSparseMatrix.from_block_mask(w, torch.full((2, 3), 0.3), 4)
    with pytest.raises(ValueError, match=r"keep must have shape \(Nb, Kb\) = \(2, 3\)"):  # silently cut before
        BlockSparseMatrix.from_block_mask(w, torch.ones(2, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockSparseMatrix.from_block_mask(w, torch.ones(2, 3, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="a meta tensor does not hold"):  # a mask names blocks: it needs values
        BlockSparseMatrix.from_dense(w.to("meta"), block_size=4, mask=torch.ones(2, 3, dtype=torch.bool))
    batched = torch.stack([good.to_dense()] * 2).to_sparse_bsr((4, 4))
    with pytest.raises(ValueError, match="plain 2-D BSR matrix"):
        BlockSparseMatrix.from_torch_bsr(batched)
    for shape in ((8,), 8, (8, 12, 1)):  # the first two were an IndexError and a TypeError
        with pytest.raises(ValueError, match=r"shape must be \(out_features, in_features\), two ints >= 1"):
            BlockSparseMatrix.from_torch_bsr(good.to_torch_bsr(), shape)


def test_a_saved_matrix_loads_with_weights_only_and_copies_copy_the_indices(tmp_path):
    good = BlockSparseMatrix.from_dense(torch.randn(8, 12), block_size=4, sparsity=0.5)
    torch.save({"w": good}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt")  # weights_only=True, torch's default
    assert loaded["w"].shape == good.shape and torch.equal(loaded["w"].to_dense(), good.to_dense())
    copied = good.to(torch.float32, copy=True)
    assert all(getattr(copied, f).data_ptr() != getattr(good, f).data_ptr()
               for f in ("values", "crow_indices", "col_indices"))


@pytest.mark.parametrize("edit, match", [("col_big", "col_indices must lie in"), ("col_neg", "col_indices must lie in"),
                                         ("crow_big", "crow_indices must be non-decreasing")])
def test_an_edited_or_loaded_pattern_is_a_named_error_not_a_read_out_of_bounds(tmp_path, edit, match):
    """The index data is checked again by to_dense, block_mask and to_torch_bsr (whose torch tensor is built
    unchecked): it may have been edited in place, or loaded with torch.load, which calls no __init__."""
    m = BlockSparseMatrix.from_dense(torch.randn(64, 64), block_size=16, sparsity=0.5)
    if edit == "crow_big":
        m.crow_indices[1] = 100_000
    else:
        m.col_indices[0] = 100_000 if edit == "col_big" else -100_000
    torch.save(m, tmp_path / "m.pt")
    for matrix in (m, torch.load(tmp_path / "m.pt")):
        for method in ("to_dense", "block_mask", "to_torch_bsr"):
            with pytest.raises(ValueError, match=f"BlockSparseMatrix.{method}: {match}"):
                getattr(matrix, method)()
    with pytest.raises(ValueError, match=f"bsr_to_dense: {match}"):  # the function under to_dense, public
        bsr_to_dense(m.values, m.crow_indices, m.col_indices, m.shape)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_lowrank_factors_of_a_non_finite_weight_is_a_named_error(bad):
    w = torch.randn(16, 12)
    w[0, 0] = bad
    with pytest.raises(ValueError, match="lowrank_factors: weight must be finite"):
        ak.lowrank_factors(w, 4)
    lstm = torch.nn.LSTM(12, 16)
    with torch.no_grad():
        lstm.weight_hh_l0[3, 2] = bad
    with pytest.raises(ValueError, match="weight must be finite"):  # an int rank too (no rank_for_energy)
        ak.nn.LowRankLSTM.from_lstm(lstm, rank=4)
