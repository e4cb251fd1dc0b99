"""The README's python examples run as written, in order, in one namespace (as a reader would paste them)."""

import pathlib
import re
import warnings

import pytest
import torch
from torch.func import grad, vmap

import amnets_kernels as ak


def test_readme_api_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ak.FallbackWarning)
        scope = {}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), scope)
    assert scope["loss"].ndim == 0 and scope["out"].shape == (100, 8, 256)


def test_higher_order_and_torch_func_limits_are_as_stated():
    """README's "Gradients beyond the first" paragraph: which orders and transforms run and which refuse."""
    lstm = ak.nn.LowRankLSTM(8, 16, rank=4)
    x = torch.randn(3, 2, 8, requires_grad=True)
    first, = torch.autograd.grad(lstm(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for amnets::lowrank_lstm_sequence_backward is not implemented"):
        first.sum().backward()
    linear = ak.nn.BlockSparseLinear(32, 16, block_size=16, sparsity=0.5)
    v = torch.randn(4, 32)
    torch.testing.assert_close(grad(lambda v: linear(v).sum())(v), linear.sparse_weight.to_dense().sum(0).expand(4, 32))
    with pytest.raises(NotImplementedError, match="lowrank_lstm_sequence: derivatives beyond the first"):
        grad(lambda x: grad(lambda x: lstm(x)[0].pow(2).sum())(x).sum())(torch.randn(3, 2, 8))
    with pytest.raises(RuntimeError, match="cannot use C\\+\\+ torch::autograd::Function with functorch"):
        grad(lambda v: torch.ops.amnets.bsr_linear(v, linear.values, linear.crow_indices, linear.col_indices, 16, 32,
                                                   None).sum())(v)
    xs = torch.randn(5, 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(vmap(linear)(xs), torch.stack([linear(v) for v in xs]))
