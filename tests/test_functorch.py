"""torch.func over the ops and modules (amnets_kernels/_ops/functorch.py): grad, jacrev, per-sample gradients
(vmap of grad), functional_call; bsr_linear also in forward mode and to second order. Each face against the
same transform over plain PyTorch math; the derivatives the ops do not have raise, naming the op."""

import warnings

import pytest
import torch
from hypothesis import given, strategies as st
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import amnets_kernels as ak
from amnets_kernels.nn import BlockSparseLinear, LowRankLSTM, LowRankLSTMCell

from conftest import DEVICE, FACES, use_face
from test_rnnt import batch_of

pytestmark = pytest.mark.filterwarnings("ignore")  # functorch's "no batching rule" and our slow-path notes

F64 = torch.float64


def flat(result) -> torch.Tensor:
    """One vector of a transform's result (a tensor, or tuples/lists/dicts by name of them, nested)."""
    if isinstance(result, dict):
        result = [result[k] for k in sorted(result)]
    if isinstance(result, (tuple, list)):
        return torch.cat([flat(p) for p in result])
    return result.reshape(-1)


def assert_same(ours, theirs):
    ours, theirs = flat(ours), flat(theirs)
    assert theirs.abs().max() > 0, "a derivative that is zero everywhere proves nothing"
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def sparse(out_features, in_features, block, sparsity=0.5):
    return ak.BlockSparseMatrix.from_dense(torch.randn(out_features, in_features, dtype=F64, device=DEVICE),
                                           block_size=block, sparsity=sparsity)


def on_pattern(weight, values):
    return ak.BlockSparseMatrix(values, weight.crow_indices, weight.col_indices, weight.shape)


TRANSFORMS = {
    "grad": lambda f, x, v, b: grad(lambda *a: f(*a).tanh().sum(), (0, 1, 2))(x, v, b),
    "jacrev": lambda f, x, v, b: jacrev(f, (0, 1, 2))(x, v, b),
    "jacfwd": lambda f, x, v, b: jacfwd(f, (0, 1, 2))(x, v, b),
    "hessian in x": lambda f, x, v, b: hessian(lambda *a: f(*a).tanh().sum(), 0)(x, v, b),
    "hessian in values": lambda f, x, v, b: hessian(lambda *a: f(*a).tanh().sum(), 1)(x, v, b),
    "hessian, mixed": lambda f, x, v, b: jacfwd(jacrev(lambda *a: f(*a).tanh().sum(), 0), 1)(x, v, b),
    "reverse over reverse": lambda f, x, v, b: jacrev(jacrev(lambda *a: f(*a).tanh().sum(), 1), (0, 1))(x, v, b),
    "reverse over reverse, x": lambda f, x, v, b: jacrev(jacrev(lambda *a: f(*a).tanh().sum(), 0), (0, 1))(x, v, b),
    "per-sample grad": lambda f, x, v, b: vmap(grad(lambda xi, v, b: f(xi[None], v, b).tanh().sum(), 1),
                                               (0, None, None))(x.reshape(-1, x.shape[-1]), v, b),
}


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_bsr_linear_under_every_transform_equals_dense(face, transform):
    weight = sparse(8, 16, 4)  # small: jacobians and Hessians run one op call per entry (vmap's fallback)
    x = torch.randn(2, 1, 16, dtype=F64, device=DEVICE)  # a leading dim more than 2-D: the reshaping path too
    bias = torch.randn(8, dtype=F64, device=DEVICE)
    ours = lambda x, v, b: ak.bsr_linear(x, on_pattern(weight, v), b)  # noqa: E731
    dense = lambda x, v, b: torch.nn.functional.linear(x, on_pattern(weight, v).to_dense(), b)  # noqa: E731
    with use_face("bsr_linear", face):
        got = TRANSFORMS[transform](ours, x, weight.values, bias)
    assert_same(got, TRANSFORMS[transform](dense, x, weight.values, bias))


@given(rows=st.integers(1, 5), blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       block=st.sampled_from([2, 16]), sparsity=st.sampled_from([0.0, 0.5]), with_bias=st.booleans())
def test_bsr_linear_grad_and_hessian_vector_products_on_generated_shapes(rows, blocks, block, sparsity, with_bias):
    weight = sparse(blocks[0] * block, blocks[1] * block, block, sparsity)
    x = torch.randn(rows, weight.shape[1], dtype=F64, device=DEVICE)
    bias = torch.randn(weight.shape[0], dtype=F64, device=DEVICE) if with_bias else None
    u = torch.randn_like(x)

    def loss(f):
        return lambda x, v: f(x, v).sin().sum()

    ours = loss(lambda x, v: ak.bsr_linear(x, on_pattern(weight, v), bias))
    dense = loss(lambda x, v: torch.nn.functional.linear(x, on_pattern(weight, v).to_dense(), bias))
    # grad, and a Hessian-vector product by forward-over-reverse (jvp of grad)
    hvp = lambda f: torch.func.jvp(lambda x: grad(f, 1)(x, weight.values), (x,), (u,))[1]  # noqa: E731
    for transform in (lambda f: grad(f, (0, 1))(x, weight.values), hvp):
        got, want = flat(transform(ours)), flat(transform(dense))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("face", FACES)
def test_block_sparse_linear_functional_call_grad_equals_autograd(face):
    layer = BlockSparseLinear(48, 32, block_size=16, sparsity=0.5).to(DEVICE, F64)
    x = torch.randn(4, 5, 48, dtype=F64, device=DEVICE)
    params = dict(layer.named_parameters())
    with use_face("bsr_linear", face):
        got = grad(lambda p: functional_call(layer, p, (x,)).pow(2).sum())(params)
        layer(x).pow(2).sum().backward()
    assert_same(got, {k: p.grad for k, p in layer.named_parameters()})


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("proj_size", [0, 4])
def test_lowrank_lstm_per_sample_gradients_equal_one_sample_at_a_time(face, proj_size):
    lstm = LowRankLSTM(6, 8, rank=3, num_layers=2, proj_size=proj_size).to(DEVICE, F64)
    xs = torch.randn(3, 5, 6, dtype=F64, device=DEVICE)  # 3 samples of (T=5, D=6)
    params = {k: p.detach() for k, p in lstm.named_parameters()}

    def loss(p, x):
        return functional_call(lstm, p, (x[:, None],))[0].pow(2).sum()

    with use_face("lowrank_lstm_sequence", face):
        got = vmap(grad(loss), (None, 0))(params, xs)
        want = []
        for x in xs:
            lstm.zero_grad()
            loss(dict(lstm.named_parameters()), x).backward()
            want.append({k: p.grad.clone() for k, p in lstm.named_parameters()})
    assert_same(got, {k: torch.stack([w[k] for w in want]) for k in got})


@pytest.mark.parametrize("face", FACES)
def test_lowrank_lstm_cell_grad_equals_autograd(face):
    cell = LowRankLSTMCell(6, 8, rank=3).to(DEVICE, F64)
    x, h, c = (torch.randn(2, n, dtype=F64, device=DEVICE) for n in (6, 8, 8))
    params = dict(cell.named_parameters())

    def loss(p, x, h, c):
        h1, c1 = functional_call(cell, p, (x, (h, c)))
        return (h1 * c1).sum()

    with use_face("lowrank_lstm_cell", face):
        got = grad(loss, (0, 1, 2, 3))(params, x, h, c)
        leaves = [t.clone().requires_grad_() for t in (x, h, c)]
        loss(params, *leaves).backward()
    assert_same(got, ({k: p.grad for k, p in cell.named_parameters()}, *(t.grad for t in leaves)))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rnnt_loss_grad_and_per_sample_grad_equal_autograd(face, reduction):
    logits, targets, frames, labels = batch_of(3, 5, 3, 6, blank=0, dtype=F64)
    logits = logits.detach()
    loss = lambda lg, t, f, u: ak.rnnt_loss(lg, t, f, u, blank=0, reduction=reduction)  # noqa: E731
    with use_face("rnnt_loss", face):
        got = grad(loss)(logits, targets, frames, labels)
        one = lambda lg, t, f, u: loss(lg[None], t[None], f[None], u[None])  # noqa: E731
        per_sample = vmap(grad(one))(logits, targets, frames, labels)
        leaf = logits.clone().requires_grad_()
        loss(leaf, targets, frames, labels).backward()
        alone = torch.stack([_grad_of(one, logits[i], targets[i], frames[i], labels[i]) for i in range(3)])
    assert_same(got, leaf.grad)
    assert_same(per_sample, alone)


def _grad_of(f, logits, *rest):
    leaf = logits.clone().requires_grad_()
    f(leaf, *rest).backward()
    return leaf.grad


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_joint_rnnt_loss_grad_equals_autograd(face, with_bias):
    _, targets, frames, labels = batch_of(2, 5, 3, 6, blank=0)
    enc, pred = torch.randn(2, 5, 4, dtype=F64, device=DEVICE), torch.randn(2, 4, 4, dtype=F64, device=DEVICE)
    weight = torch.randn(6, 4, dtype=F64, device=DEVICE)
    bias = torch.randn(6, dtype=F64, device=DEVICE) if with_bias else None
    loss = lambda e, p, w, b: ak.fused_joint_rnnt_loss(e, p, w, b, targets, frames, labels, blank=0)  # noqa: E731
    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    with use_face("fused_joint_rnnt_loss", face):
        got = grad(loss, argnums)(enc, pred, weight, bias)
        leaves = [None if t is None else t.clone().requires_grad_() for t in (enc, pred, weight, bias)]
        loss(*leaves).backward()
    assert_same(got, [t.grad for t in leaves if t is not None])


@pytest.mark.parametrize("swap", [dict(lstm_rank=4, linear_sparsity=0.5), dict(lstm_sparsity=0.5)],
                         ids=["lowrank+sparse linear", "block-sparse LSTM"])
def test_a_swapped_model_under_functional_call_grad_equals_autograd(swap):
    class Acoustic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = torch.nn.LSTM(16, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    model = Acoustic().double()
    ak.swap_in(model, block_size=16, only_if_cheaper=False, **swap)
    assert type(model.lstm).__module__.startswith("amnets_kernels")
    x = torch.randn(3, 2, 16, dtype=F64)
    params = dict(model.named_parameters())
    got = grad(lambda p: functional_call(model, p, (x,)).pow(2).sum())(params)
    model(x).pow(2).sum().backward()
    assert_same(got, {k: p.grad for k, p in model.named_parameters()})


def test_the_amnets_model_loss_under_functional_call_grad_equals_autograd():
    """The training loss of the AmNets model (its encoder, the fused joint) through torch.func."""
    from amnets.model import AmNetsRNNT

    model = AmNetsRNNT(input_size=8, vocab_size=6, hidden_size=16, num_layers=2, cheap="lowrank").double()
    feats = torch.randn(2, 7, 8, dtype=F64)
    lengths = torch.tensor([7, 5])
    targets, target_lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    params = dict(model.named_parameters())

    def loss(p):
        torch.manual_seed(1)  # the same Gumbel noise for the arbitrator's decisions in both runs
        return functional_call(model, p, (feats, lengths, targets, target_lengths), {"cost_weight": 0.1})[0]

    got = grad(loss)(params)
    loss(params).backward()
    assert_same({k: v for k, v in got.items() if model.get_parameter(k).grad is not None},
                {k: p.grad for k, p in model.named_parameters() if p.grad is not None})


def _rnnt_of_logits():
    """rnnt_loss as a function of (1, 2, 2, 3) logits alone (labels made outside any transform)."""
    labels = batch_of(1, 2, 1, 3, blank=0)[1:]
    return lambda logits: ak.rnnt_loss(logits, *labels, blank=0)


# (op, a function of one tensor through it, that tensor); modules are built outside the transforms.
ONE_INPUT = {
    "lowrank_lstm_sequence": lambda: ((lambda m: lambda x: m(x)[0].sum())(LowRankLSTM(4, 4, rank=2)),
                                      torch.randn(2, 1, 4)),
    "lowrank_lstm_cell": lambda: ((lambda m: lambda x: m(x)[0].sum())(LowRankLSTMCell(4, 4, rank=2)),
                                  torch.randn(1, 4)),
    "rnnt_loss": lambda: (_rnnt_of_logits(), torch.randn(1, 2, 2, 3)),
}


@pytest.mark.parametrize("what", ONE_INPUT)
def test_a_second_derivative_the_op_lacks_raises_naming_it(what):
    """Never a silent zero: the backward of these ops is differentiable no further."""
    f, x = ONE_INPUT[what]()
    with pytest.raises(NotImplementedError, match=f"{what}: derivatives beyond the first are not supported"):
        jacrev(jacrev(f))(x)


@pytest.mark.parametrize("what", ONE_INPUT)
def test_forward_mode_the_op_lacks_raises_naming_it(what):
    f, x = ONE_INPUT[what]()
    with pytest.raises(NotImplementedError, match=f"{what}: forward-mode derivatives"):
        jacfwd(f)(x)


def test_bad_input_under_a_transform_gets_the_ops_named_error():
    weight = sparse(32, 32, 16)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal in_features = 32"):
        grad(lambda x: ak.bsr_linear(x, weight).sum())(torch.randn(2, 31, dtype=F64, device=DEVICE))
    logits, targets, frames, labels = batch_of(1, 3, 2, 4, blank=0, dtype=F64)
    with pytest.raises(ValueError, match="reduction must be one of"):
        grad(lambda lg: ak.rnnt_loss(lg, targets, frames, labels, blank=0, reduction="avg"))(logits.detach())
    with pytest.raises(ValueError, match="blank"):
        grad(lambda lg: ak.rnnt_loss(lg, targets, frames, labels, blank=9))(logits.detach())


def test_outside_a_transform_the_native_path_runs():
    """The Python Functions are for transforms only: a plain call records the C++ autograd node."""
    weight = sparse(32, 32, 16)
    x = torch.randn(2, 32, dtype=F64, device=DEVICE, requires_grad=True)
    name = ak.bsr_linear(x, weight).grad_fn.name()
    assert "CppNode" in name and "BsrLinear" in name, name  # the C++ node (Python's: _BsrLinearBackward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning says anything about transforms
        ak.bsr_linear(x, weight)


def _counted(monkeypatch, name: str) -> list:
    """The row counts of every call the torch.func route makes to one of its op directions."""
    import amnets_kernels._ops.functorch as functorch_route

    op, rows = getattr(functorch_route, name), []

    def counted(*args):
        rows.append(args[0].shape[0])
        return op(*args)

    counted.__name__ = op.__name__
    monkeypatch.setattr(functorch_route, name, counted)
    return rows


@pytest.mark.parametrize("face", FACES)
def test_vmap_over_inputs_is_one_bsr_linear_call_on_every_row(face, monkeypatch):
    """bsr_linear's batching rule: vmap over x, and jacrev in x (a vmap of the backward over the basis
    cotangents), fold the samples into the rows of one call each, without the per-sample warning."""
    weight = sparse(32, 48, 16)
    bias = torch.randn(32, dtype=F64, device=DEVICE)
    xs = torch.randn(5, 3, 48, dtype=F64, device=DEVICE)
    forward, backward = _counted(monkeypatch, "_BSR_FORWARD"), _counted(monkeypatch, "_BSR_BACKWARD")
    ours = lambda x: ak.bsr_linear(x, weight, bias)  # noqa: E731
    with use_face("bsr_linear", face), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(per sample|per member|batching rule)")  # float64's slow path
        outputs = vmap(ours)(xs)
        jacobian = jacrev(ours)(xs[0])  # (3, 32, 3, 48): 96 cotangents
    assert forward == [15, 3] and backward == [96 * 3], (forward, backward)
    dense = lambda x: torch.nn.functional.linear(x, weight.to_dense(), bias)  # noqa: E731
    assert_same(outputs, dense(xs))
    assert_same(jacobian, jacrev(dense)(xs[0]))


def test_vmap_says_once_where_it_runs_per_sample(capfd):
    """Each case vmap cannot batch says so once, in Python: PyTorch's C++ warning, queued in a call that then
    raised, turned the named error into a SystemError (a model ensemble with one corrupted member after a good
    call: tests/test_nn.py)."""
    import amnets_kernels._ops.functorch as functorch_route

    weight = sparse(32, 32, 16)
    x = torch.randn(3, 2, 32, dtype=F64, device=DEVICE)
    cell = [torch.randn(3, 2, 8, dtype=F64, device=DEVICE), torch.zeros(2, 4, dtype=F64, device=DEVICE),
            torch.zeros(2, 4, dtype=F64, device=DEVICE)] + \
           [torch.randn(*shape, dtype=F64, device=DEVICE) for shape in ((16, 2), (2, 8), (16, 2), (2, 4))]
    lattice = (torch.randn(2, 4, 3, 5, dtype=F64, device=DEVICE), torch.tensor([[1, 2]], device=DEVICE),
               torch.tensor([4], device=DEVICE), torch.tensor([2], device=DEVICE))
    cases = {
        "lowrank_lstm_cell_forward under torch.func.vmap runs once per sample":
            lambda: vmap(lambda x: ak.lowrank_lstm_cell(x, *cell[1:])[0])(cell[0]),
        "bsr_linear under torch.func.vmap computes the values' gradient once per sample":
            lambda: vmap(grad(lambda x, v: ak.bsr_linear(x, on_pattern(weight, v)).sum(), 1), (0, None))(
                x, weight.values),
        "bsr_linear under torch.func.vmap over stacked weights runs once per member":
            lambda: vmap(lambda v: ak.bsr_linear(x[0], on_pattern(weight, v)))(torch.stack([weight.values] * 2)),
        # (and its reduction, amnets::_rnnt_reduce, without PyTorch's own warning asking for a GitHub issue)
        "rnnt_loss_forward under torch.func.vmap runs once per sample":
            lambda: vmap(lambda lg: ak.rnnt_loss(lg[None], *lattice[1:], blank=0))(lattice[0]),
    }
    functorch_route._per_sample_said.clear()
    for message, run in cases.items():
        with pytest.warns(UserWarning, match=message):
            run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for run in cases.values():
            run()
    assert "performance drop" not in capfd.readouterr().err  # PyTorch's own, logged to stderr from C++
