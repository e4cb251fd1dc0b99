"""The drop-in modules: BlockSparseLinear, LowRankLSTM, RNNTLoss, FusedJointRNNTLoss."""

import io

import pytest
import torch
import torch.nn.utils.prune
import torchaudio
from torch import nn

import amnets_kernels as ak
from amnets_kernels.nn import (BlockSparseLinear, BlockSparseLSTM, FusedJointRNNTLoss, LowRankLSTM, LowRankLSTMCell,
                               RNNTLoss)

from conftest import DEVICE, FACES, use_face
from test_rnnt import batch_of


def round_trip(module, fresh):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense, which is beside the point here
def test_a_checkpoint_of_another_layer_shape_is_a_size_mismatch_and_changes_nothing():
    """Another pattern, sparsity or block size loads (the saved pattern replaces the module's); another layer
    shape raises as nn.Linear / nn.LSTM do, with or without strict, and leaves the module as it was."""
    from amnets_kernels.nn import BlockSparseLSTM

    torch.manual_seed(0)
    pairs = [(BlockSparseLinear(32, 16, 16, 0.5, bias=False), BlockSparseLinear(64, 48, 16, 0.5, bias=False)),
             (BlockSparseLinear(32, 16, 16, 0.5), BlockSparseLinear(32, 32, 16, 0.5)),
             (BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5), BlockSparseLSTM(16, 32, block_size=16, sparsity=0.5)),
             (BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5), BlockSparseLSTM(48, 16, block_size=16, sparsity=0.5)),
             (BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5), BlockSparseLSTM(16, 15, block_size=16, sparsity=0.5))]
    for module, other in pairs:
        before = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        for strict in (True, False):
            with pytest.raises(RuntimeError, match="size mismatch"):
                module.load_state_dict(other.state_dict(), strict=strict)
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), type(module).__name__
    old_style = BlockSparseLSTM(16, 32, block_size=16, sparsity=0.5).state_dict()
    old_style["_extra_state"] = {"block_size": 16}  # a checkpoint from before the sizes were saved
    with pytest.raises(RuntimeError, match="does not fit"):
        BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5).load_state_dict(old_style)
    same_shape = BlockSparseLSTM(16, 16, block_size=8, sparsity=0.8)  # another block size and pattern: loads
    same_shape.load_state_dict(pairs[2][0].state_dict())
    x = torch.randn(3, 2, 16)
    torch.testing.assert_close(same_shape(x)[0], pairs[2][0](x)[0])
    # A tensor-only checkpoint (safetensors: no _extra_state) of another block size: its values' blocks say it.
    tensors_only = {k: v for k, v in pairs[2][0].state_dict().items() if k != "_extra_state"}
    other_block = BlockSparseLSTM(16, 16, block_size=8, sparsity=0.8)
    assert other_block.load_state_dict(tensors_only, strict=False).missing_keys == ["_extra_state"]
    assert other_block.block_size == 16
    torch.testing.assert_close(other_block(x)[0], pairs[2][0](x)[0])
    mixed = dict(tensors_only, values_l0=torch.zeros(2, 16, 8))  # not square blocks: refused, nothing changed
    with pytest.raises(RuntimeError, match="square blocks of one size"):
        other_block.load_state_dict(mixed, strict=False)
    assert other_block.block_size == 16


def test_inconsistent_or_narrower_checkpoints_are_refused_before_anything_changes():
    """Each of these loaded before (a probe, 2026-12-05): the first two left a module whose every forward raised,
    the last two gave wrong outputs silently (a layer of 16 inputs read as 32: its recurrent weights met x)."""
    source = BlockSparseLSTM(16, 32, block_size=16, sparsity=0.0)
    target = BlockSparseLSTM(32, 32, block_size=16, sparsity=0.0)
    sd = BlockSparseLSTM(32, 32, block_size=16, sparsity=0.0).state_dict()
    before = {k: v.clone() for k, v in target.state_dict().items() if k != "_extra_state"}
    for bad, match in ((dict(sd, col_indices_l0=sd["col_indices_l0"][:-1]), "a block per column index"),
                       (dict(sd, values_l0=sd["values_l0"][:, :8, :8]), r"\(nnzb, b, b\) = \(\d+, 16, 16\)")):
        with pytest.raises(RuntimeError, match=match):
            target.load_state_dict(bad)
    narrower = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="whose blocks stop at block column 2, where this layer has 4 of 16"):
        target.load_state_dict(narrower, strict=False)
    linear = {k: v for k, v in BlockSparseLinear(16, 32, block_size=16, sparsity=0.0).state_dict().items()
              if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="whose blocks stop at block column 0, where this layer has 2 of 16"):
        BlockSparseLinear(32, 32, block_size=16, sparsity=0.0).load_state_dict(linear, strict=False)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and target.block_size == 16
    # a tensor-only checkpoint of this very shape still loads
    own = {k: v for k, v in sd.items() if k != "_extra_state"}
    assert target.load_state_dict(own, strict=False).missing_keys == ["_extra_state"]


@pytest.mark.parametrize("face", FACES)
def test_block_sparse_linear_from_dense_trains_kept_blocks(face):
    with use_face("bsr_linear", face):
        linear = nn.Linear(70, 40).to(DEVICE)
        sparse = BlockSparseLinear.from_dense(linear, block_size=16, sparsity=0.5)
        x = torch.randn(3, 5, 70, device=DEVICE)
        expected = nn.functional.linear(x, sparse.sparse_weight.to_dense(), linear.bias)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
        sparse(x).sum().backward()
        assert sparse.values.grad is not None and sparse.values.grad.shape == sparse.values.shape
        assert sparse.bias.grad is not None
        assert sparse.sparse_weight.values is sparse.values and 0.4 < sparse.density < 0.6


def test_block_sparse_linear_state_dict_prune_and_torch_bsr():
    layer = BlockSparseLinear(48, 32, block_size=16, sparsity=0.75)
    other = round_trip(layer, BlockSparseLinear(48, 32, block_size=16, sparsity=0.25))  # another pattern
    x = torch.randn(2, 48)
    torch.testing.assert_close(other(x), layer(x))
    linear = nn.Linear(48, 32)
    torch.nn.utils.prune.random_unstructured(linear, "weight", amount=0.95)
    pruned = BlockSparseLinear.from_dense(linear, block_size=8)  # the prune mask decides
    torch.testing.assert_close(pruned(x), linear(x), rtol=1e-5, atol=1e-5)
    from_bsr = BlockSparseLinear.from_torch_bsr(layer.sparse_weight.to_torch_bsr(), layer.bias)
    torch.testing.assert_close(from_bsr(x), layer(x))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        BlockSparseLinear.from_dense(nn.Conv1d(2, 2, 1))


def test_low_rank_lstm_is_a_drop_in_and_learns():
    torch.manual_seed(0)
    lstm = LowRankLSTM(8, 16, rank=4, num_layers=2)
    head = nn.Linear(16, 1)
    opt = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=0.02)
    x = torch.randn(20, 4, 8)
    target = x.sum(-1, keepdim=True).cumsum(0) / 10
    with ak.use_backend("reference"):
        first = None
        for _ in range(40):
            loss = nn.functional.mse_loss(head(lstm(x)[0]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first
    assert lstm.macs_per_frame() == sum(r1 * (d + 64) + r2 * (16 + 64) for (r1, r2), d in zip(lstm.ranks, (8, 16)))
    again = round_trip(lstm, LowRankLSTM(8, 16, rank=4, num_layers=2))
    torch.testing.assert_close(again(x)[0], lstm(x)[0])


def test_low_rank_lstm_energy_rank_and_errors():
    lstm = nn.LSTM(32, 16)
    low = LowRankLSTM.from_lstm(lstm, rank=0.5)
    assert all(1 <= r1 <= 32 and 1 <= r2 <= 16 for r1, r2 in low.ranks)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must be input_size = 32"):
        low(torch.randn(3, 2, 31))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(num_layers \* num_directions, B, hidden_size\) = "
                                         r"\(1, 2, 16\)"):
        low(torch.randn(3, 2, 32), (torch.zeros(1, 3, 16), torch.zeros(1, 3, 16)))


@pytest.mark.parametrize("face", FACES)
def test_rnnt_loss_module_is_torchaudios(face):
    with use_face("rnnt_loss", face):
        logits, targets, logit_lengths, target_lengths = batch_of(3, 6, 4, 9, 0)
        ours = RNNTLoss(blank=0, clamp=0.5, reduction="sum")(logits, targets, logit_lengths, target_lengths)
        theirs = torchaudio.transforms.RNNTLoss(blank=0, clamp=0.5, reduction="sum")(
            logits.cpu(), targets.int().cpu(), logit_lengths.int().cpu(), target_lengths.int().cpu())
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("face", FACES)
def test_fused_joint_module_equals_materialised_logits(face):
    with use_face("fused_joint_rnnt_loss", face):
        joint = FusedJointRNNTLoss(8, 9, blank=0).to(DEVICE)
        enc = torch.randn(3, 6, 8, device=DEVICE, requires_grad=True)
        pred = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
        _, targets, logit_lengths, target_lengths = batch_of(3, 6, 4, 9, 0)
        loss = joint(enc, pred, targets, logit_lengths, target_lengths)
        expected = RNNTLoss(blank=0)(joint.logits(enc, pred), targets, logit_lengths, target_lengths)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        linear = nn.Linear(8, 9)
        shared = FusedJointRNNTLoss.from_linear(linear, blank=0)
        assert shared.weight is linear.weight and shared.bias is linear.bias


@pytest.mark.parametrize("build, error, match", [
    (lambda: FusedJointRNNTLoss(0, 6), ValueError, "FusedJointRNNTLoss: hidden_size must be >= 1"),  # was 1/0
    (lambda: FusedJointRNNTLoss(4, -1), ValueError, "FusedJointRNNTLoss: vocab_size must be >= 1"),
    (lambda: FusedJointRNNTLoss(2.5, 6), TypeError, "FusedJointRNNTLoss: hidden_size must be an int"),
    (lambda: FusedJointRNNTLoss(4, 0), ValueError, "vocab_size must be >= 1"),  # these four: at the first call
    (lambda: FusedJointRNNTLoss(4, 6, activation="gelu"), ValueError, "activation must be one of"),
    (lambda: FusedJointRNNTLoss(4, 6, blank=6), ValueError, r"blank must be in \[-V, V\) = \[-6, 6\)"),
    (lambda: FusedJointRNNTLoss(4, 6, reduction="max"), ValueError, "reduction must be one of"),
    (lambda: RNNTLoss(blank=0.0), TypeError, "RNNTLoss: blank must be an int"),
    (lambda: RNNTLoss(clamp="x"), TypeError, "RNNTLoss: clamp must be a float"),
    (lambda: RNNTLoss(zero_infinity=1), TypeError, "RNNTLoss: zero_infinity must be a bool"),
    (lambda: BlockSparseLinear(0, 4), ValueError, "BlockSparseLinear: in_features must be >= 1"),
    (lambda: BlockSparseLinear(4, -1), ValueError, "BlockSparseLinear: out_features must be >= 1"),
    (lambda: BlockSparseLinear(4.0, 4), TypeError, "BlockSparseLinear: in_features must be an int"),
])
def test_module_settings_are_checked_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be >= 1"), (dict(rank=4, num_layers=0), "num_layers must be >= 1"),
    (dict(rank=4, rank_hh=0), "rank_hh must be >= 1"), (dict(rank=2.5), "rank must be an int")])
def test_lowrank_lstm_bad_sizes_are_errors_naming_them(kwargs, match):
    error = TypeError if isinstance(kwargs.get("rank"), float) else ValueError
    with pytest.raises(error, match=match):
        LowRankLSTM(8, 8, **kwargs)


@pytest.mark.parametrize("rank", [-3, 0, 0.0, 1.5, True, "8"])
def test_from_lstm_rejects_ranks_it_cannot_mean(rank):
    with pytest.raises(ValueError, match="rank must be an int >= 1 or a float in"):
        LowRankLSTM.from_lstm(torch.nn.LSTM(8, 8), rank=rank)


@pytest.mark.parametrize("make", [lambda: BlockSparseLSTM(32, 32, block_size=16, sparsity=0.5),
                                  lambda: LowRankLSTM(32, 32, rank=8),
                                  lambda: BlockSparseLinear(32, 32, block_size=16, sparsity=0.5)],
                         ids=["BlockSparseLSTM", "LowRankLSTM", "BlockSparseLinear"])
@pytest.mark.parametrize("grad", [False, True])
def test_a_model_ensemble_runs_under_vmap(make, grad):
    """torch.func.vmap over stacked weights (stack_module_state + functional_call: a model ensemble) equals
    each model run alone; each member's own block pattern is used and checked (the op checks every sample's
    pattern when it runs: a corrupted one is a named error, not a read out of bounds)."""
    import copy
    import warnings

    from torch.func import functional_call, stack_module_state, vmap

    members = [make() for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 2, 32)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731

    def ensemble(p, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's "no batching rule" performance warning
            return vmap(lambda p, b: first(functional_call(base, (p, b), (x,))))(p, b)

    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(ensemble(params, buffers), torch.stack([first(m(x)) for m in members]))
        for name in [n for n in buffers if n.startswith("col_indices")][:1]:  # the sparse modules
            bad = dict(buffers, **{name: buffers[name].clone()})
            bad[name][1, 0] = 10_000  # the second member's first block
            with pytest.raises(ValueError, match="col_indices"):
                ensemble(params, bad)


# Modules whose checkpoint may have other shapes than a fresh module's (make(True): that checkpoint's settings):
# another pruning pattern, other low-rank ranks (lstm_rank=0.9 picks them from the weights).
RESHAPED_BY_LOAD = {
    "BlockSparseLinear": lambda saved: BlockSparseLinear(64, 64, 16, sparsity=0.75 if saved else 0.5),
    "BlockSparseLSTM": lambda saved: BlockSparseLSTM(16, 16, block_size=16, sparsity=0.75 if saved else 0.5),
    "LowRankLSTM": lambda saved: LowRankLSTM(16, 16, rank=3 if saved else 7, num_layers=2),
    "LowRankLSTMCell": lambda saved: LowRankLSTMCell(16, 16, rank=3 if saved else 7),
}


def _train_step(module, opt):
    x = torch.randn(8, 64) if isinstance(module, BlockSparseLinear) else torch.randn(3, 2, 16)
    opt.zero_grad()
    out = module(x) if not isinstance(module, LowRankLSTMCell) else module(x[0], (torch.randn(2, 16),) * 2)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    opt.step()


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
@pytest.mark.parametrize("make", RESHAPED_BY_LOAD.values(), ids=RESHAPED_BY_LOAD.keys())
def test_loading_other_shapes_keeps_the_tensors_an_optimizer_holds(make):
    """A checkpoint of another pattern or other ranks resizes the module's own parameters and buffers in place: an
    optimizer built before the load (resuming a run) keeps training them. (The low-rank modules replaced their
    factors by new parameters, and such an optimizer trained the old ones, silently.)"""
    torch.manual_seed(0)
    module, checkpoint = make(False), make(True).state_dict()
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module.load_state_dict(checkpoint)
    for name, t in tensors.items():
        assert getattr(module, name) is t and torch.equal(t, checkpoint[name]), name
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for _ in range(2):
        _train_step(module, opt)
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
@pytest.mark.parametrize("make", RESHAPED_BY_LOAD.values(), ids=RESHAPED_BY_LOAD.keys())
@pytest.mark.parametrize("optimizer", [lambda p: torch.optim.Adam(p, lr=0.1),
                                       lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                       lambda p: torch.optim.Adafactor(p, lr=0.1)], ids=["Adam", "SGD", "Adafactor"])
def test_an_optimizer_state_of_the_old_shapes_is_refused_by_name(make, optimizer):
    """An optimizer that stepped before a load gave a parameter another shape holds a state of the old shape: its
    next step names the parameter and the way out (load the optimizer's state, or drop it), where the step itself
    failed with a bare size mismatch; after either, training goes on. Factored states (Adafactor's row and
    column statistics) are not taken for stale ones."""
    torch.manual_seed(0)
    module, checkpoint = make(False), make(True).state_dict()
    opt = optimizer(module.parameters())
    _train_step(module, opt)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    module.load_state_dict(checkpoint)
    resized = [n for n, p in module.named_parameters() if p.shape != shapes[n]]
    with pytest.raises(ValueError, match=rf"{type(opt).__name__}.step: its state for ({'|'.join(resized)}) "
                                         r"\('.+' of shape \([\d, ]+\)\) was made before load_state_dict gave"):
        _train_step(module, opt)
    for p in module.parameters():
        opt.state.pop(p, None)
    _train_step(module, opt)
    _train_step(module, opt)  # a state made for the new shapes passes
    fresh = optimizer(module.parameters())  # resuming: the optimizer's state saved with the checkpoint
    _train_step(module, fresh)
    opt.load_state_dict(fresh.state_dict())
    _train_step(module, opt)


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
def test_from_lstm_and_the_constructors_take_numpy_ranks_as_swap_in_does():
    import numpy as np

    from amnets_kernels.nn import LowRankLSTMCell

    lstm, cell = nn.LSTM(8, 8), nn.LSTMCell(8, 8)
    for rank in (np.int64(4), np.int32(4)):
        assert LowRankLSTM.from_lstm(lstm, rank=rank, rank_hh=rank).ranks == [(4, 4)]
        assert LowRankLSTMCell.from_lstm_cell(cell, rank=rank).ranks == (4, 4)
        for ranks in (LowRankLSTM(8, 8, rank=rank, rank_hh=rank).ranks[0], LowRankLSTMCell(8, 8, rank).ranks):
            assert ranks == (4, 4) and all(type(r) is int for r in ranks)  # plain ints: state, repr, configs
    with pytest.raises(TypeError, match="LowRankLSTM: rank must be an int; got float64"):
        LowRankLSTM(8, 8, rank=np.float64(4))
    with pytest.raises(ValueError, match="LowRankLSTMCell: rank_hh must be >= 1; got 0"):
        LowRankLSTMCell(8, 8, 4, rank_hh=np.int64(0))
    assert LowRankLSTM.from_lstm(lstm, rank=np.float32(1.0)).ranks == LowRankLSTM.from_lstm(lstm, rank=1.0).ranks


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
def test_block_sparse_lstm_copies_leave_the_inference_caches_behind():
    """deepcopy and torch.save of the module carry no caches built from the original's tensors; the copy
    builds its own."""
    import copy

    torch.manual_seed(0)
    lstm = BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5).eval()
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        want = lstm(x)[0]
    assert lstm._steps and lstm._splits
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(lstm), torch.load(buffer, weights_only=False)):
        assert other._steps == {} and other._splits == {}
        with torch.no_grad():
            torch.testing.assert_close(other(x)[0], want, rtol=0, atol=0)
        assert other.last_path == lstm.last_path and other._splits
    assert lstm._steps and lstm._splits  # the original keeps its own
