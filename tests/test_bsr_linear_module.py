"""BlockSparseLinear as a module: tensor-only checkpoints, gradients across a pattern change, argument types."""

import pytest
import torch

from amnets_kernels.nn import BlockSparseLinear

pytestmark = pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense, beside the point here


def tensors_only(module):
    """The state_dict as safetensors keeps it: tensors, no _extra_state."""
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def snapshot(module):
    return {k: v.clone() for k, v in tensors_only(module).items()}, module.block_size


def assert_unchanged(module, before, x, y):
    state, block_size = before
    after = tensors_only(module)
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert module.block_size == block_size
    torch.testing.assert_close(module(x), y, rtol=0, atol=0)  # and it still runs as before


@pytest.mark.parametrize("saved, mismatch", [
    (lambda: BlockSparseLinear(48, 96, 16, 0.5), "crow_indices/col_indices"),  # another out_features
    (lambda: BlockSparseLinear(96, 64, 16, 0.0), "crow_indices/col_indices"),  # another in_features (every column)
    (lambda: BlockSparseLinear(48, 60, 16, 0.25), "bias"),  # the same block rows, another bias
], ids=["out_features", "in_features", "bias"])
@pytest.mark.parametrize("strict", [True, False])
def test_a_tensor_only_checkpoint_of_another_shape_is_a_size_mismatch_and_changes_nothing(saved, mismatch, strict):
    torch.manual_seed(0)
    module, x = BlockSparseLinear(48, 64, 16, 0.75), torch.randn(3, 48)
    before, y = snapshot(module), module(x)
    with pytest.raises(RuntimeError, match=f"size mismatch for {mismatch}"):
        module.load_state_dict(tensors_only(saved()), strict=strict)
    assert_unchanged(module, before, x, y)


@pytest.mark.parametrize("strict", [True, False])
def test_a_tensor_only_checkpoint_without_square_blocks_is_refused(strict):
    module, x = BlockSparseLinear(64, 64, 16, 0.5), torch.randn(2, 64)
    before, y = snapshot(module), module(x)
    bad = tensors_only(module)
    bad["values"] = bad["values"].reshape(-1, 16, 8)
    with pytest.raises(RuntimeError, match=r"size mismatch for values: .*\(nnzb, b, b\).*got \(16, 16, 8\)"):
        module.load_state_dict(bad, strict=strict)
    assert_unchanged(module, before, x, y)


def test_a_fitting_tensor_only_checkpoint_of_another_block_size_loads_and_the_block_size_follows():
    torch.manual_seed(0)
    saved, module, x = BlockSparseLinear(64, 80, 32, 0.5), BlockSparseLinear(64, 80, 16, 0.75), torch.randn(3, 64)
    result = module.load_state_dict(tensors_only(saved), strict=False)
    assert result.missing_keys == ["_extra_state"] and not result.unexpected_keys
    assert module.block_size == 32 and module.values.shape == saved.values.shape
    torch.testing.assert_close(module(x), saved(x), rtol=0, atol=0)
    assert module.to_dense().weight.equal(saved.to_dense().weight)


def test_a_gradient_of_the_old_pattern_is_dropped_when_another_pattern_loads():
    torch.manual_seed(0)
    module, x = BlockSparseLinear(64, 64, 16, 0.5), torch.randn(2, 64)
    module(x).sum().backward()
    bias_grad = module.bias.grad
    saved = BlockSparseLinear(64, 64, 32, 0.5)
    module.load_state_dict(saved.state_dict())
    assert module.values.grad is None  # (16, 16, 16) blocks' gradient: meaningless for (2, 32, 32) ones
    assert module.bias.grad is bias_grad  # same shape: kept, as any load keeps gradients
    module(x).sum().backward()  # raised a size mismatch of 16 and 32
    expected = torch.autograd.grad(saved(x).sum(), saved.values)[0]
    torch.testing.assert_close(module.values.grad, expected)


@pytest.mark.parametrize("x", [None, [[1.0] * 64], 3.0], ids=["None", "list", "float"])
def test_a_non_tensor_input_is_a_type_error_naming_x(x):
    with pytest.raises(TypeError, match=r"^BlockSparseLinear: x must be a torch.Tensor; got (NoneType|list|float)$"):
        BlockSparseLinear(64, 64, 16, 0.5)(x)


@pytest.mark.parametrize("bias, error, match", [
    (torch.zeros(3), ValueError, r"bias must have shape \(out_features,\) = \(32,\); got \(3,\)"),
    (torch.zeros(32, dtype=torch.float64), TypeError, "bias has dtype torch.float64 but weight has torch.float32"),
    ([0.0] * 32, TypeError, "bias must be a torch.Tensor; got list"),
], ids=["length", "dtype", "list"])
def test_from_torch_bsr_checks_the_bias(bias, error, match):
    weight = BlockSparseLinear(48, 32, 16, 0.5).sparse_weight.to_torch_bsr()
    with pytest.raises(error, match=f"^BlockSparseLinear.from_torch_bsr: {match}"):
        BlockSparseLinear.from_torch_bsr(weight, bias)
    assert BlockSparseLinear.from_torch_bsr(weight, torch.zeros(32)).bias.shape == (32,)


def test_reset_parameters_redraws_the_kept_blocks_in_place_at_nn_linears_scale():
    """As nn.Linear.reset_parameters: the same parameter objects drawn anew from uniform(-1/sqrt(in), 1/sqrt(in)),
    the pattern kept and block entries past the layer's shape zero; `.weight`, which nn.Linear code reads, says
    where the weight is instead."""
    torch.manual_seed(0)
    layer = BlockSparseLinear(40, 24, block_size=16, sparsity=0.5)  # padded: 2 x 3 blocks over (24, 40)
    values, bias, pattern = layer.values, layer.bias, (layer.crow_indices.clone(), layer.col_indices.clone())
    before = values.detach().clone()
    layer.reset_parameters()
    assert layer.values is values and layer.bias is bias and not torch.equal(values, before)
    assert torch.equal(layer.crow_indices, pattern[0]) and torch.equal(layer.col_indices, pattern[1])
    dense = layer.to_dense().weight.detach()
    kept = layer.sparse_weight.block_mask().repeat_interleave(16, 0).repeat_interleave(16, 1)[:24, :40]
    assert dense[kept].abs().max() <= 40 ** -0.5 and (dense[kept] != 0).all() and (dense[~kept] == 0).all()
    assert bias.abs().max() <= 40 ** -0.5
    assert values.abs().sum() == dense.abs().sum()  # nothing stored past the shape
    with pytest.raises(AttributeError, match="BlockSparseLinear has no 'weight'.*sparse_weight"):
        layer.weight
