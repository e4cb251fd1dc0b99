"""BlockSparseMatrix under torch.compile(fullgraph=True) with the default (inductor) backend: built inside
a compiled forward, read from BlockSparseLinear.sparse_weight, passed in as an argument, returned, and
exported; equal to eager mode in the forward and the gradients. Plus its pytree registration."""

import pytest
import torch
import torch.utils._pytree as pytree

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix
from amnets_kernels.nn import BlockSparseLinear

from helpers import close, grads, rand

# Block 16 has the compiled faces' fast kernels; block 4 goes through bsr_linear's slow-path warning,
# which calls into the extension's backend state, which Dynamo cannot trace (see the xfail below).
SHAPE, BLOCK = (32, 24), 16  # 2 x 2 blocks, the last block column half padding

def _pattern(shape=SHAPE, block=BLOCK):
    torch.manual_seed(0)
    return BlockSparseMatrix.from_dense(rand(*shape), block_size=block, sparsity=0.5)


def _same_as_eager(module, x, params):
    """Compiled module equals eager, output and the gradients w.r.t. x and `params`."""
    eager = module(x)
    compiled = torch.compile(module, fullgraph=True)(x)
    close(compiled, eager)
    inputs = [x, *params]
    for got, want in zip(grads(compiled, inputs), grads(eager, inputs)):
        close(got, want)
    return compiled


class BuildsMatrix(torch.nn.Module):
    def __init__(self, matrix):
        super().__init__()
        self.values = torch.nn.Parameter(matrix.values.clone())
        self.register_buffer("crow", matrix.crow_indices.clone())
        self.register_buffer("col", matrix.col_indices.clone())
        self.shape = matrix.shape

    def forward(self, x):
        return ak.bsr_linear(x, BlockSparseMatrix(self.values, self.crow, self.col, self.shape))


@pytest.mark.parametrize("shape, block", [(SHAPE, BLOCK), ((12, 8), 4)])
def test_matrix_built_in_compiled_forward(shape, block):
    module = BuildsMatrix(_pattern(shape, block))
    out = _same_as_eager(module, rand(3, shape[1], requires_grad=True), [module.values])
    assert out.shape == (3, shape[0])


class ReadsSparseWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = BlockSparseLinear(SHAPE[1], SHAPE[0], block_size=BLOCK, sparsity=0.5)

    def forward(self, x):
        return ak.bsr_linear(x, self.lin.sparse_weight, self.lin.bias) * self.lin.density


def test_sparse_weight_property_in_compiled_forward():
    module = ReadsSparseWeight()
    out = _same_as_eager(module, rand(2, 3, SHAPE[1], requires_grad=True), [module.lin.values, module.lin.bias])
    assert out.shape == (2, 3, SHAPE[0])


def test_matrix_as_argument_and_result_of_compiled_function():
    matrix = _pattern()
    matrix.values.requires_grad_(True)
    x = rand(3, SHAPE[1], requires_grad=True)

    def apply(x, weight):
        return ak.bsr_linear(x, weight) * 2

    compiled = torch.compile(apply, fullgraph=True)
    out, eager = compiled(x, matrix), apply(x, matrix)
    close(out, eager)
    for got, want in zip(grads(out, [x, matrix.values]), grads(eager, [x, matrix.values])):
        close(got, want)
    other = BlockSparseMatrix(rand(*matrix.values.shape), matrix.crow_indices.clone(),
                              matrix.col_indices.clone(), SHAPE)
    close(compiled(x, other), apply(x, other))  # new tensors of the same pattern: same graph, new data

    scaled = torch.compile(lambda w: BlockSparseMatrix(w.values * 3, w.crow_indices, w.col_indices, w.shape),
                           fullgraph=True)(matrix)
    assert isinstance(scaled, BlockSparseMatrix) and scaled.shape == SHAPE
    close(scaled.values, matrix.values * 3)
    assert scaled.crow_indices.equal(matrix.crow_indices) and scaled.col_indices.equal(matrix.col_indices)


def test_index_data_is_checked_by_the_op_when_tracing_skips_it():
    # The constructor skips reading the indices while tracing; the op reads them on every real call.
    matrix = _pattern()

    def build(x, col):
        return ak.bsr_linear(x, BlockSparseMatrix(matrix.values, matrix.crow_indices, col, SHAPE))

    build = torch.compile(build, fullgraph=True)
    x = rand(3, SHAPE[1])
    close(build(x, matrix.col_indices), ak.bsr_linear(x, matrix))
    with pytest.raises(ValueError, match="col_indices must lie in"):
        build(x, matrix.col_indices + 5)


def test_export_takes_a_matrix_input():
    matrix, other = _pattern(), _pattern()
    other.values = rand(*other.values.shape)

    class Apply(torch.nn.Module):
        def forward(self, x, weight):
            return ak.bsr_linear(x, weight)

    x = rand(3, SHAPE[1])
    program = torch.export.export(Apply(), (x, matrix))
    assert len(program.graph_signature.user_inputs) == 4  # x and the matrix's three tensors, flattened
    close(program.module()(x, other), ak.bsr_linear(x, other))


def test_pytree_round_trip():
    matrix = _pattern()
    leaves, spec = pytree.tree_flatten(matrix)
    assert leaves[0] is matrix.values and leaves[1] is matrix.crow_indices and leaves[2] is matrix.col_indices
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, BlockSparseMatrix) and back.shape == matrix.shape
    assert back.values is matrix.values and back.crow_indices is matrix.crow_indices
    assert back.col_indices is matrix.col_indices
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec  # export's serialised form
    paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(matrix)[0]]
    assert paths == [".values", ".crow_indices", ".col_indices"]
    # Unflatten takes leaves as they are (tree_map may give None or other dtypes): no checks, no narrowing.
    wide = pytree.tree_map(lambda t: t.to(torch.float64), matrix)
    assert wide.crow_indices.dtype == torch.float64 and wide.shape == matrix.shape
    assert pytree.tree_map(lambda t: None, matrix).values is None
    # Inside containers too.
    nested = {"w": matrix, "b": torch.zeros(2)}
    assert len(pytree.tree_leaves(nested)) == 4
