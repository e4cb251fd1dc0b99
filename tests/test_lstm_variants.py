"""LowRankLSTM / BlockSparseLSTM / LowRankLSTMCell against nn.LSTM / nn.LSTMCell at full rank / sparsity 0,
with every option combination nn.LSTM has (layers, bidirectional, proj_size, batch_first, hx, unbatched),
on every face; dropout between layers; the way back (to_dense); the cost warnings."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import amnets_kernels as ak
from amnets_kernels.nn import BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell, NotCheaperWarning
from amnets_kernels.nn import bsr as bsr_module, lowrank_lstm as lowrank_module
from amnets_kernels.nn.stacked_lstm import StackedLSTM

from conftest import DEVICE, FACES, use_face

stacked_ops = {"lowrank": lowrank_module, "sparse": bsr_module}  # their module-level _stack: the native stack step
OPTIONS = list(itertools.product([1, 2], [False, True], [0, 3], [False, True]))  # layers, bidir, proj, batch_first


def exact(module, lstm, args, grad=True):
    """module(*args) equals lstm(*args) (nn.LSTM on the CPU: cuDNN may use TF32), outputs and input gradients."""
    x = args[0].clone().requires_grad_(grad)
    mine = module(*((x.to(DEVICE),) + tuple(tuple(t.to(DEVICE) for t in a) for a in args[1:])))
    xr = args[0].clone().requires_grad_(grad)
    theirs = lstm(xr, *args[1:])
    flat_m, flat_t = [mine[0], *mine[1]], [theirs[0], *theirs[1]]
    for got, want in zip(flat_m, flat_t):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=2e-5)
    if grad:
        weights = [torch.randn_like(t) for t in flat_t]
        sum((g * w.to(DEVICE)).sum() for g, w in zip(flat_m, weights)).backward()
        sum((g * w).sum() for g, w in zip(flat_t, weights)).backward()
        torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=0, atol=5e-5)
    return mine


def cases(layers, bidirectional, proj, batch_first):
    torch.manual_seed(layers * 8 + bidirectional * 4 + proj + batch_first)
    lstm = nn.LSTM(6, 8, num_layers=layers, bidirectional=bidirectional, proj_size=proj, batch_first=batch_first)
    stack, (b, t) = layers * (2 if bidirectional else 1), ((3, 5) if batch_first else (5, 3))
    x = torch.randn(b, t, 6)
    hx = (torch.randn(stack, 3, proj or 8), torch.randn(stack, 3, 8))
    return lstm, [(x,), (x, hx), (torch.randn(4, 6),)]  # the last one unbatched, as nn.LSTM allows


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("layers, bidirectional, proj, batch_first", OPTIONS)
def test_lowrank_lstm_at_full_rank_is_the_lstm(face, layers, bidirectional, proj, batch_first):
    lstm, calls = cases(layers, bidirectional, proj, batch_first)
    with use_face("lowrank_lstm_sequence", face), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)  # full rank costs more than dense: it is a test
        low = LowRankLSTM.from_lstm(lstm, rank=10**6).to(DEVICE)
        for args in calls:
            exact(low, lstm, args)
        assert low.ranks == [(min(4 * 8, d), proj or 8) for _, _, _, d in low.directions()]  # full rank
        exact(low.to_dense(), lstm, calls[1])  # the way back: a plain nn.LSTM


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("layers, bidirectional, proj, batch_first", [
    (1, False, 0, False), (2, True, 0, True), (2, False, 0, True), (1, True, 0, False),
    (2, False, 3, False), (2, True, 3, True), (1, False, 3, True)])
def test_block_sparse_lstm_at_sparsity_zero_is_the_lstm(face, layers, bidirectional, proj, batch_first):
    lstm, calls = cases(layers, bidirectional, proj, batch_first)
    with use_face("bsr_linear", face), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparsity 0 pays nothing; block 16 is below a face's fast sizes
        sparse = BlockSparseLSTM.from_lstm(lstm, sparsity=0.0, block_size=16).to(DEVICE)
        for args in calls:
            exact(sparse, lstm, args)
        with torch.no_grad():  # inference: on the cpu face, one native call per direction
            exact(sparse, lstm, calls[1], grad=False)
            assert sparse.last_path == ("native sequence" if face == "cpu" else "steps")
        exact(sparse.to_dense(), lstm, calls[0])


@pytest.mark.parametrize("face", FACES)
def test_lowrank_lstm_cell_at_full_rank_is_the_cell(face):
    torch.manual_seed(0)
    cell = nn.LSTMCell(6, 5)
    with use_face("lowrank_lstm_cell", face), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)
        low = LowRankLSTMCell.from_lstm_cell(cell, 10**6).to(DEVICE)
    x, hx = torch.randn(4, 6), (torch.randn(4, 5), torch.randn(4, 5))
    with use_face("lowrank_lstm_cell", face):
        for args, dense in (((x, hx), cell), ((x,), cell), ((x[0],), cell), ((x, hx), low.to_dense())):
            got = low(args[0].to(DEVICE), *(tuple(t.to(DEVICE) for t in a) for a in args[1:]))
            for g, w in zip(got, dense(*args)):
                torch.testing.assert_close(g.cpu(), w, rtol=0, atol=2e-5)


def test_dropout_between_layers_as_lstm():
    torch.manual_seed(0)
    low = LowRankLSTM(6, 8, rank=2, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 6)
    low.eval()
    assert torch.equal(low(x)[0], low(x)[0])  # no dropout in eval
    low.train()
    torch.manual_seed(1)
    a = low(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, low(x)[0])  # dropout in training
    one = LowRankLSTM(6, 8, rank=2, num_layers=1, dropout=0.5)  # nothing after the last layer
    assert torch.equal(one(x)[0], one(x)[0])
    assert low.to_dense().dropout == 0.5


def test_not_cheaper_is_never_silent():
    with pytest.warns(NotCheaperWarning, match=r"LowRankLSTM: 40,960 MACs per frame, no fewer than the dense layer's 32,768"):
        LowRankLSTM.from_lstm(nn.LSTM(64, 64), 256)
    with pytest.warns(NotCheaperWarning, match="keeps no block"):
        BlockSparseLSTM(8, 8, sparsity=1.0, block_size=16)
    with pytest.warns(NotCheaperWarning, match="no fewer"):
        LowRankLSTMCell(8, 8, rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCheaperWarning)
        LowRankLSTM(64, 64, rank=8)  # cheap: silent
        BlockSparseLSTM(64, 64, sparsity=0.75, block_size=16)


@pytest.mark.parametrize("write", ["fused optimizer step", ".data in place", ".data re-pointed at the old address"])
def test_block_sparse_lstm_inference_follows_writes_that_bump_no_version(write):
    """The native path's split weights are a copy: a fused=True optimizer step (which on the CPU leaves the
    version counters as they were), an edit through .data followed by amnets_kernels.weights_changed(), and
    `.data = new` with the new buffer where the old one was (the allocator's reuse in a perturb-evaluate-restore
    loop; here two storages over one numpy buffer) must each show in the next no-grad call, which must equal
    the grad-mode path and the dense LSTM."""
    import amnets_kernels as ak

    if write.endswith("old address") and DEVICE != "cpu":
        pytest.skip("numpy buffers are host memory")
    torch.manual_seed(1)
    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16).to(DEVICE)
    x = torch.randn(5, 3, 16, device=DEVICE)
    with torch.no_grad():
        lstm(x)  # builds the cache
    if write == "fused optimizer step":
        for p in lstm.parameters():
            p.grad = torch.randn_like(p)
        torch.optim.SGD(lstm.parameters(), lr=0.5, fused=True).step()
    elif write == ".data in place":
        lstm.values_l0.data.mul_(-2.0)
        ak.weights_changed()
    else:
        buffer = lstm.values_l0.detach().numpy().copy()
        lstm.values_l0.data = torch.from_numpy(buffer)
        with torch.no_grad():
            lstm(x)  # the cache, of this storage
        buffer *= -2.0
        lstm.values_l0.data = torch.from_numpy(buffer)  # another storage, same address, same version
        assert lstm.values_l0.data_ptr() == buffer.ctypes.data
    with torch.no_grad():
        got = lstm(x)[0]
    torch.testing.assert_close(got, lstm(x)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.cpu(), lstm.to_dense().cpu()(x.cpu())[0], rtol=0, atol=1e-5)


def test_block_sparse_lstm_caches_are_rebuilt_exactly_when_their_sources_change():
    """BlockSparseLSTM's two inference caches, per direction: the prepared step holds the values and bias and
    follows their in-place writes (an optimizer step must not rebuild it), the native path's split weights
    copy the values and are rebuilt after them; both are rebuilt when a tensor is re-pointed or the pattern
    edited. Inference tensors are cached too (a model loaded for serving): their in-place writes keep no
    version, so the split copy follows one after ak.weights_changed(), as it does a .data write."""
    torch.manual_seed(2)
    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16)
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        lstm(x)
        step, split = lstm._steps[0], lstm._splits[0]
        lstm(x)
        assert lstm._steps[0] is step and lstm._splits[0] is split  # unchanged: from the cache
        lstm.values_l0.mul_(-1.0)
        lstm.bias_l0.add_(0.5)
        got = lstm(x)[0]
        assert lstm._steps[0] is step and lstm._splits[0] is not split  # the step follows, the copy is redone
        assert lstm._steps[1] is not None and lstm._splits[1][1] is not None
        torch.testing.assert_close(got, lstm.to_dense()(x)[0], rtol=0, atol=1e-5)
        lstm.bias_l0.data = lstm.bias_l0.clone()  # re-pointed: the step holds the old tensor's storage
        lstm(x)
        assert lstm._steps[0] is not step
        step = lstm._steps[0]
        lstm.col_indices_l0.copy_(lstm.col_indices_l0.clone())  # a pattern written in place (here: unchanged)
        lstm(x)
        assert lstm._steps[0] is not step
    with torch.inference_mode():
        served = BlockSparseLSTM(16, 32, sparsity=0.5, block_size=16)
        served(x)
        split = served._splits[0]
        served.values_l0.mul_(-1.0)  # no version: the split copy cannot see it, the step (holding values) does
        torch.testing.assert_close(served(x[:1])[0], served.to_dense()(x[:1])[0], rtol=0, atol=1e-5)
        assert served._splits[0] is split
        ak.weights_changed()
        got = served(x)[0]
    assert served._splits[0] is not split
    with torch.no_grad():
        torch.testing.assert_close(got, served.to_dense()(x)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrap", ["prune", "parametrize"])
def test_block_sparse_lstm_runs_under_pruning_and_parametrizations(wrap):
    """torch.nn.utils.prune and parametrizations move `values` out of the module's parameters (it is computed
    on each forward or access): the caches keyed on the parameter dicts raised KeyError; now nothing is cached
    for it, and the result is the reparametrized weight's."""
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(3)
    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16)
    x = torch.randn(4, 2, 16)
    if wrap == "prune":
        prune.l1_unstructured(lstm, "values_l0", amount=0.3)
    else:
        class Double(nn.Module):
            def forward(self, v):
                return 2 * v
        parametrize.register_parametrization(lstm, "values_l0", Double())
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = lstm(x)[0]
            torch.testing.assert_close(got, lstm.to_dense()(x)[0], rtol=0, atol=1e-5)


def test_block_sparse_lstm_streams_a_frame_a_call_on_its_own_blocks():
    """One frame a call without autograd takes the fused step on the module's own values and pattern (no split
    copy): the same answer as one call over the sequence, and an edit no version records (.data) is seen."""
    torch.manual_seed(0)
    lstm = BlockSparseLSTM(32, 32, num_layers=2, block_size=16, sparsity=0.5).eval()
    x = torch.randn(6, 3, 32)
    with torch.no_grad():
        want, (h_n, c_n) = lstm(x)
        state, outs = None, []
        for frame in x.split(1):
            out, state = lstm(frame, state)
            outs.append(out)
        assert lstm.last_path == "fused step"
        torch.testing.assert_close(torch.cat(outs), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[0], h_n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[1], c_n, rtol=1e-5, atol=1e-6)
        lstm.values_l1.data.mul_(0.5)
        torch.testing.assert_close(lstm(x[:1], state)[0], lstm.to_dense()(x[:1], state)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["prune", "parametrize"])
def test_lowrank_lstm_runs_a_pruned_or_reparametrized_factor(wrap):
    """LowRankLSTM reads its factors from its parameter dict (a streaming step's host cost); a factor that
    prune or a parametrization computes anew is not there, and what they compute is what must run."""
    import copy

    from torch.nn.utils import parametrize, prune

    torch.manual_seed(3)
    lstm = LowRankLSTM(16, 32, rank=4, num_layers=2)
    plain, x = copy.deepcopy(lstm), torch.randn(4, 2, 16)
    before = lstm(x)[0].detach()
    if wrap == "prune":
        prune.l1_unstructured(lstm, "w_ih_u_l1", amount=0.5)
    else:
        class Double(nn.Module):
            def forward(self, v):
                return 2 * v
        parametrize.register_parametrization(lstm, "w_ih_u_l1", Double())
    with torch.no_grad():
        plain.w_ih_u_l1.copy_(lstm.w_ih_u_l1)  # the factor as the wrapper computes it
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = lstm(x)[0]
            torch.testing.assert_close(got, plain(x)[0], rtol=0, atol=0)
            assert not torch.allclose(got, before)
            torch.testing.assert_close(lstm.layer_weights(1)[0], lstm.w_ih_u_l1, rtol=0, atol=0)


@pytest.mark.parametrize("layer, reverse, match", [(-1, False, "layer"), (2, False, "layer"), (0, True, "layer"),
                                                   (1.0, False, "layer"), (0, "yes", "reverse")])
def test_lowrank_lstm_layer_weights_names_a_layer_it_lacks(layer, reverse, match):
    lstm = LowRankLSTM(16, 32, rank=4, num_layers=2)
    with pytest.raises((ValueError, TypeError), match=match):
        lstm.layer_weights(layer, reverse)
    assert lstm.layer_weights(np.int64(1))[0] is lstm.w_ih_u_l1  # numpy integers, as the constructors take


@pytest.mark.parametrize("make", [lambda: LowRankLSTM(6, 8, rank=3, num_layers=2, bidirectional=True),
                                  lambda: BlockSparseLSTM(6, 16, num_layers=2, block_size=16, sparsity=0.5)])
def test_lstm_module_pickled_before_its_direction_index_still_runs(make):
    """A whole module pickled by an older version (no `_directions` / `_names`, built at construction now)
    loads and runs: they are rebuilt from its configuration."""
    import pickle

    module, x = make(), torch.randn(3, 2, 6)
    want = module(x)[0]
    del module.__dict__["_directions"], module.__dict__["_names"]
    loaded = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(loaded(x)[0], want, rtol=0, atol=0)


def _bad_hx_cases():
    h, c = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    return [
        ("batched", (h,), TypeError, r"hx must be None or a tuple \(h_0, c_0\); got a tuple of 1"),
        ("batched", (h, c, c), TypeError, "got a tuple of 3"),
        ("batched", torch.stack([h, c]), TypeError, "got Tensor"),
        ("batched", (None, c), TypeError, "h_0 must be a torch.Tensor"),
        ("batched", (h.double(), c), TypeError, "h_0 must have the input's dtype torch.float32"),
        ("batched", (h, c.to("meta")), ValueError, r"c_0 must be on the input's device \(cpu\)"),
        ("unbatched", (h, c), ValueError, r"h_0 must be 2-D; got shape \(2, 3, 8\)"),
        ("unbatched", (h[:, 0, :3], c[:, 0]), ValueError, r"h_0 must have shape \(num_layers \* num_directions, "
                                                            r"hidden_size\) = \(2, 8\); got \(2, 3\)"),
        ("packed", (h[:, 0], c[:, 0]), ValueError, r"h_0 must be 3-D; got shape \(2, 8\)"),
    ]


@pytest.mark.parametrize("kind, hx, error, match", _bad_hx_cases())
@pytest.mark.parametrize("make", [lambda: LowRankLSTM(4, 8, rank=2, num_layers=2),
                                  lambda: BlockSparseLSTM(4, 8, num_layers=2, block_size=4, sparsity=0.5)])
def test_lstm_module_names_a_bad_hx_as_the_caller_gave_it(make, kind, hx, error, match):
    """hx is checked as given (before the unbatched unsqueeze or the packed rows' selection, which made the
    messages show shapes the caller never passed), with its pair structure, dtype and device."""
    module = make()
    x = torch.randn(5, 3, 4)
    if kind == "unbatched":
        x = x[:, 0]
    elif kind == "packed":
        x = nn.utils.rnn.pack_sequence([torch.randn(5, 4)])
    with pytest.raises(error, match=match):
        module(x, hx)


def test_lowrank_lstm_with_projection_checks_hx_before_its_first_step():
    """With proj_size the first step runs in F.linear before the op's checks: hx's dtype and device gave
    ATen's messages, and an int64 c_0 ran."""
    lstm = LowRankLSTM(4, 8, rank=2, num_layers=2, proj_size=3)
    x, h, c = torch.randn(5, 3, 4), torch.zeros(2, 3, 3), torch.zeros(2, 3, 8)
    for bad, error, match in (((h.double(), c), TypeError, "h_0 must have the input's dtype"),
                              ((h, c.long()), TypeError, "c_0 must have the input's dtype"),
                              ((h, c.to("meta")), ValueError, "c_0 must be on the input's device")):
        with pytest.raises(error, match=match):
            lstm(x, bad)


def test_lowrank_lstm_cell_names_the_input_and_hx():
    cell = LowRankLSTMCell(6, 8, rank=3)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must be input_size = 6; got shape \(3, 5\)"):
        cell(torch.randn(3, 5))
    with pytest.raises(TypeError, match="h_0 must be a torch.Tensor"):
        cell(torch.randn(3, 6), (None, torch.zeros(3, 8)))
    with pytest.raises(TypeError, match="hx must be None or a tuple"):
        cell(torch.randn(3, 6), (torch.zeros(3, 8),))


@pytest.mark.parametrize("make", [lambda: LowRankLSTM(6, 8, rank=3), lambda: BlockSparseLSTM(6, 16, block_size=16)])
def test_lstm_module_says_where_nn_lstm_dense_weights_went(make):
    module = make()
    for name in ("weight_ih_l0", "bias_hh_l0", "all_weights"):
        with pytest.raises(AttributeError, match=f"has no '{name}'.*to_dense"):
            getattr(module, name)
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        module.nonsense
    assert not hasattr(module, "weight_hh_l0") and hasattr(module, "bias_l0")


def test_lowrank_lstm_warns_of_dropout_with_one_layer_as_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        LowRankLSTM(6, 8, rank=3, dropout=0.5)


def test_block_sparse_lstm_caches_let_the_cycle_collector_free_the_module():
    """A parameter referring back to its module (an attribute, a hook's closure) makes a cycle through the
    caches' snapshots of the module's dicts; the snapshots were invisible to the cycle collector, so every
    such module leaked with its weights."""
    import gc
    import weakref

    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16)
    lstm.values_l0.owner = lstm
    with torch.no_grad():
        lstm(torch.randn(3, 2, 16))
    assert lstm._steps and lstm._splits
    gone = weakref.ref(lstm)
    del lstm
    gc.collect()
    assert gone() is None


def test_block_sparse_lstm_leaves_the_callers_state_alone():
    """The native no-grad path wrote h_n into the caller's h_0 (fp32, H a multiple of the block): a second
    identical call then gave another output."""
    torch.manual_seed(4)
    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16, bidirectional=True)
    x, h0, c0 = torch.randn(5, 3, 16), torch.randn(4, 3, 32), torch.randn(4, 3, 32)
    kept = h0.clone(), c0.clone()
    with torch.no_grad():
        first = lstm(x, (h0, c0))[0]
        assert lstm.last_path == "native sequence"
        assert torch.equal(h0, kept[0]) and torch.equal(c0, kept[1])
        torch.testing.assert_close(lstm(x, (h0, c0))[0], first, rtol=0, atol=0)


def test_block_sparse_lstm_follows_a_re_view_of_the_same_memory():
    """`.data = values.transpose(1, 2)` keeps the storage, data pointer, element count and version: only the
    strides tell it; the split weights were stale (error 0.7)."""
    torch.manual_seed(5)
    lstm = BlockSparseLSTM(16, 32, num_layers=1, sparsity=0.5, block_size=16)
    x = torch.randn(4, 2, 16)
    with torch.no_grad():
        lstm(x)
        lstm.values_l0.data = lstm.values_l0.data.transpose(1, 2)
        torch.testing.assert_close(lstm(x)[0], lstm.to_dense()(x)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", ["sparse", "lowrank"])
def test_modules_run_on_the_meta_device_as_nn_lstm_does(cls):
    """A model built or moved to "meta" (to be materialised later) runs for shapes, as nn.LSTM does; the
    autocast check asked "meta" for an autocast state it has none of (RuntimeError)."""
    module = (BlockSparseLSTM(16, 32, sparsity=0.5, block_size=16) if cls == "sparse"
              else LowRankLSTM(16, 32, rank=4)).to("meta")
    x = torch.randn(5, 2, 16, device="meta")
    out, (h, c) = module(x)
    want, (h_want, _) = nn.LSTM(16, 32).to("meta")(x)
    assert out.shape == want.shape and h.shape == h_want.shape and out.device.type == "meta"


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
@pytest.mark.parametrize("grad", [True, False])
def test_no_time_steps_is_a_named_error_as_for_nn_lstm(grad):
    for module in (LowRankLSTM(16, 16, rank=4), BlockSparseLSTM(16, 16, block_size=16, sparsity=0.5)):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="at least one time step"):
            module.to(DEVICE)(torch.randn(0, 2, 16, device=DEVICE))


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
@pytest.mark.parametrize("hx", [False, True])
def test_under_autocast_results_take_its_dtype_as_nn_lstm(hx):
    """nn.LSTM under autocast computes in, and returns, the autocast dtype: so must both drop-ins (given the
    same fp32 input and state), with values within that dtype's rounding of the dense LSTM's."""
    torch.manual_seed(2)
    lstm = nn.LSTM(16, 32, num_layers=2).to(DEVICE)
    x = torch.randn(6, 3, 16, device=DEVICE)
    state = (torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 3, 32, device=DEVICE)) if hx else None
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    for module in (LowRankLSTM.from_lstm(lstm, rank=10**6), BlockSparseLSTM.from_lstm(lstm, sparsity=0.5, block_size=16)):
        module, dense = module.to(DEVICE), module.to_dense().to(DEVICE)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), torch.autocast(DEVICE, dtype=dtype):
                got, (h, c) = module(x, state)
                want, (h2, c2) = dense(x, state)
            assert got.dtype == h.dtype == c.dtype == want.dtype == dtype, (type(module).__name__, got.dtype)
            for a, b in ((got, want), (h, h2), (c, c2)):
                torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 4, 2]))
        with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
            got, want = module(packed, state)[0], dense(packed, state)[0]
        assert got.data.dtype == want.data.dtype  # nn.LSTM's: fp32 for a PackedSequence under CPU autocast
        torch.testing.assert_close(got.data.float(), want.data.float(), rtol=0.05, atol=0.05)


def test_block_sparse_lstm_trains_and_round_trips():
    torch.manual_seed(0)
    lstm = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16)
    head = nn.Linear(32, 1)
    opt = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=0.02)
    x = torch.randn(12, 4, 16)
    target = x.sum(-1, keepdim=True).cumsum(0) / 10
    with torch.no_grad():
        lstm(x)  # the native path's split weights, cached: the optimizer's in-place steps must renew them
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(head(lstm(x)[0]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        torch.testing.assert_close(lstm(x)[0], lstm.to_dense()(x)[0], rtol=0, atol=1e-5)
    other = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.75, block_size=16)  # another pattern
    other.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(other(x)[0], lstm(x)[0])
    # With a projection (proj_size): every weight trains, the checkpoint loads into another pattern, and one
    # without the projection is refused by name.
    projected = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.5, block_size=16, proj_size=8)
    projected(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projected.parameters())
    again = BlockSparseLSTM(16, 32, num_layers=2, sparsity=0.75, block_size=16, proj_size=8)
    again.load_state_dict(projected.state_dict())
    torch.testing.assert_close(again(x)[0], projected(x)[0])
    with pytest.raises(RuntimeError, match="'proj_size': 0} cannot load into this one with .*'proj_size': 8}"):
        projected.load_state_dict(lstm.state_dict())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("bidirectional, enforce_sorted", [(False, True), (True, False)])
def test_packed_sequences_as_lstm(face, bidirectional, enforce_sorted):
    """Each sequence runs to its own length (the reverse direction from its own last frame); the output
    keeps the input's packing, h_n / c_n the caller's row order."""
    torch.manual_seed(3)
    lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([7, 5, 3, 3]) if enforce_sorted else torch.tensor([3, 7, 5, 3])
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(7, 4, 6), lengths, enforce_sorted=enforce_sorted)
    hx = (torch.randn(2 * (1 + bidirectional), 4, 8), torch.randn(2 * (1 + bidirectional), 4, 8))
    with use_face("lowrank_lstm_sequence", face), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = LowRankLSTM.from_lstm(lstm, 10**6).to(DEVICE)
        sparse = BlockSparseLSTM.from_lstm(lstm, 0.0, 16).to(DEVICE)
        for module in (low, sparse):
            for args in ((packed,), (packed, hx)):
                out, (h, c) = module(packed.to(DEVICE), *(tuple(t.to(DEVICE) for t in a) for a in args[1:]))
                e_out, (e_h, e_c) = lstm(*args)
                assert torch.equal(out.batch_sizes, e_out.batch_sizes)
                for got, want in ((out.data, e_out.data), (h, e_h), (c, e_c)):
                    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=2e-5)


def test_modules_built_under_inference_mode_run():
    """A model loaded for serving under torch.inference_mode() holds inference tensors (no version counter)."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = [BlockSparseLSTM(16, 16, sparsity=0.5, block_size=16), LowRankLSTM(16, 16, rank=4, bidirectional=True)]
        x = torch.randn(5, 2, 16)
        first = [m(x)[0] for m in modules]
    with torch.no_grad():
        for m, want in zip(modules, first):
            torch.testing.assert_close(m(x)[0], want)
            torch.testing.assert_close(m(x)[0], m.to_dense()(x)[0], rtol=0, atol=1e-5)
    # Cached as any weights (every call rebuilt them: such a model ran 2-3x slower than the dense LSTM). They
    # have no version: an in-place edit (inside inference mode) is seen after weights_changed(), as a .data write.
    sparse, frame = modules[0], torch.randn(1, 2, 16)
    with torch.inference_mode():
        sparse(frame)
        assert "_stack_call" in sparse.__dict__ and sparse._splits
        kept = sparse._splits[0]
        sparse(x)
        assert sparse._splits[0] is kept
        sparse.values_l0.mul_(0.5)
        ak.weights_changed()
        for inp in (x, frame):
            torch.testing.assert_close(sparse(inp)[0], sparse.to_dense()(inp)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("proj", [0, 8])
@pytest.mark.parametrize("how", ["reset_parameters", "load_state_dict"])
def test_weights_rewritten_in_inference_mode_are_followed(how, proj):
    """Inference tensors (a model built and loaded under inference_mode, as servers do) bump no version when
    written in place: reset_parameters() and load_state_dict (of the module or of a model holding it) say so
    themselves (weights_changed()), so no cache (the sparse split, the stack call) keeps the old weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)
        makers = [lambda: BlockSparseLSTM(24, 32, num_layers=2, block_size=16, sparsity=0.5, proj_size=proj),
                  lambda: LowRankLSTM(24, 32, rank=8, num_layers=2, proj_size=proj)]
        for make in makers:
            with torch.inference_mode():
                module = make().eval()
                # a checkpoint of the same pattern and ranks, other values
                other = {k: (v.clone() if "indices" in k else v * 1.5 + 0.01) if torch.is_tensor(v) else v
                         for k, v in module.state_dict().items()}
                for x in (torch.randn(5, 2, 24), torch.randn(1, 2, 24)):
                    module(x), module(x)  # the caches built
                    if how == "reset_parameters":
                        module.reset_parameters()
                    else:
                        nn.Sequential(module).load_state_dict({f"0.{k}": v for k, v in other.items()})
                    torch.testing.assert_close(module(x)[0], module.to_dense()(x)[0], rtol=0, atol=2e-5)


def test_projected_lowrank_lstm_gives_every_factor_a_gradient():
    """nn.LSTM's zero state at one step: the recurrent factors get a (zero) gradient, not None (DDP without
    find_unused_parameters refuses a parameter that got none)."""
    for proj in (0, 8):
        module = LowRankLSTM(24, 32, rank=8, proj_size=proj)
        out, (h, c) = module(torch.randn(1, 2, 24))
        (out.sum() + c.sum()).backward()
        assert [n for n, p in module.named_parameters() if p.grad is None] == []
        assert not module.w_hh_u_l0.grad.any()  # the zero state's gradient


def _layer_by_layer(monkeypatch, module):
    """The module with its whole-stack step switched off: each layer its own op call, as before it existed."""
    monkeypatch.setattr(type(module), "_stack_step", StackedLSTM._stack_step)
    module.__dict__.pop("_stack_call", None)  # (and the one-call path kept once it ran)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["lowrank", "sparse"]), layers=st.integers(1, 3), bias=st.booleans(),
       batch=st.integers(0, 6), given_hx=st.booleans(), unbatched=st.booleans(), batch_first=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), proj=st.sampled_from([0, 0, 12]),
       seed=st.integers(0, 2**16))
def test_a_frame_a_call_runs_the_whole_stack_in_one_native_call(kind, layers, bias, batch, given_hx, unbatched,
                                                                 batch_first, dtype, proj, seed):
    """A unidirectional stack stepped one frame a call without autograd (a swapped model streaming, the cpu face)
    runs every layer in one native call (lowrank_lstm_stack_step / bsr_lstm_stack_step): the same outputs and
    state as layer by layer, for every layout, state, batch and weight dtype the layers take, and with a
    projection (proj_size, low-rank)."""
    if DEVICE != "cpu":
        pytest.skip("the whole-stack step is the cpu face's")
    torch.manual_seed(seed)
    lstm = nn.LSTM(40, 48, layers, bias=bias, batch_first=batch_first, proj_size=proj)
    module = (LowRankLSTM.from_lstm(lstm, rank=8) if kind == "lowrank"
              else BlockSparseLSTM.from_lstm(lstm, sparsity=0.5, block_size=16)).eval().to(dtype)
    batch = 1 if unbatched else batch
    x = torch.randn((1, 40) if unbatched else (batch, 1, 40) if batch_first else (1, batch, 40), dtype=dtype)
    state = [torch.randn(layers, width, dtype=dtype) if unbatched else torch.randn(layers, batch, width, dtype=dtype)
             for width in (proj or 48, 48)]
    hx = tuple(state) if given_hx else None
    calls = []
    stack = stacked_ops[kind]
    real = stack._stack
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(stack, "_stack", lambda *args: calls.append(1) or real(*args))
        got = module(x, hx)
        assert calls == [1]
        again = module(x, hx)  # from forward's arguments in one native call (_C.StackCall), the op not called
        assert calls == [1] and module.__dict__.get("_stack_call") is not None
        _layer_by_layer(patch, module)
        want = module(x, hx)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    for result in (got, again):
        for mine, theirs in zip((result[0], *result[1]), (want[0], *want[1])):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            torch.testing.assert_close(mine, theirs, **tolerance)  # (B > 4 rows: both run the one-step sequence)
        for out, state in zip(result[1], hx or ()):
            assert out.numel() == 0 or out.data_ptr() != state.data_ptr()  # fresh state tensors, not the caller's


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_a_projected_stack_streams_in_one_native_call_and_sees_its_projection_change(kind):
    """LowRankLSTM / BlockSparseLSTM with proj_size stepped a frame a call (an LSTMP encoder streaming) runs the
    whole stack in one native call too, frame after frame equal to nn.LSTM with the same weights; a projection
    written in place or replaced is what the next frame reads."""
    if DEVICE != "cpu":
        pytest.skip("the whole-stack step is the cpu face's")
    torch.manual_seed(0)
    lstm = nn.LSTM(24, 32, 2, proj_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)  # full rank / sparsity 0: nn.LSTM's answers
        module = (LowRankLSTM.from_lstm(lstm, rank=32) if kind == "lowrank"
                  else BlockSparseLSTM.from_lstm(lstm, sparsity=0.0, block_size=16)).eval()
    frames, hx, dense_hx = torch.randn(6, 1, 2, 24), None, None
    with torch.no_grad():
        for step, frame in enumerate(frames):
            if step == 3:
                module.w_hr_l1.mul_(0.5)  # in place
            if step == 4:
                module.w_hr_l0 = nn.Parameter(torch.randn(8, 32))  # replaced
            out, hx = module(frame, hx)
            want, dense_hx = module.to_dense()(frame, dense_hx)
            assert out.shape == (1, 2, 8) and hx[0].shape == (2, 2, 8) and hx[1].shape == (2, 2, 32)
            for mine, theirs in zip((out, *hx), (want, *dense_hx)):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
            if step:
                assert module.__dict__.get("_stack_call") is not None


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_the_whole_stack_step_leaves_errors_to_the_layers(monkeypatch, kind):
    """What the native stack step refuses (here fp64 weights with an fp32 frame) raises what the layer-by-layer
    path raises, in its words; autograd, training dropout and bidirectional stacks never take the stack step."""
    if DEVICE != "cpu":
        pytest.skip("the whole-stack step is the cpu face's")
    lstm = nn.LSTM(32, 32, 2, dropout=0.5)
    module = (LowRankLSTM.from_lstm(lstm, rank=8) if kind == "lowrank"
              else BlockSparseLSTM.from_lstm(lstm, sparsity=0.5, block_size=16))
    x = torch.randn(1, 2, 32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked_ops[kind], "_stack", lambda *args: pytest.fail("the stack step ran"))
        module.train()(x)  # dropout between layers in force
        module.eval()(x.requires_grad_())  # autograd
        LowRankLSTM.from_lstm(nn.LSTM(32, 32, bidirectional=True), rank=8).eval()(x.detach())
    double = module.double()
    with torch.no_grad(), pytest.raises((TypeError, ValueError)) as stacked:
        double(x.detach())
    _layer_by_layer(monkeypatch, double)
    with torch.no_grad(), pytest.raises(type(stacked.value)) as layered:
        double(x.detach())
    assert str(stacked.value) == str(layered.value)


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_the_one_call_frame_declines_wherever_the_python_path_must_decide(kind):
    """Once a frame has run the native stack step, forward's first call is _C.StackCall (one native call from
    forward's own arguments). It runs the frame only while it is plain eager inference on the cpu face with the
    module's tensors unchanged (values written in place are read as they are); anything else goes the Python
    way, with its answers and its errors."""
    if DEVICE != "cpu":
        pytest.skip("the whole-stack step is the cpu face's")
    import copy
    import io

    import amnets_kernels as ak
    torch.manual_seed(0)
    module = (LowRankLSTM.from_lstm(nn.LSTM(32, 32, 2), rank=8) if kind == "lowrank"
              else BlockSparseLSTM.from_lstm(nn.LSTM(32, 32, 2), sparsity=0.5, block_size=16)).eval()
    weight = module.w_ih_u_l0 if kind == "lowrank" else module.values_l0
    x, hx = torch.randn(1, 2, 32), (torch.randn(2, 2, 32), torch.randn(2, 2, 32))
    ran = []

    def frame(*args, took: bool, **grad):
        """module(*args) (under no_grad unless grad=True), checked against the dense equivalent; whether the
        one-call path ran it is `took`."""
        real = module.__dict__.get("_stack_call")
        if real is not None:
            module.__dict__["_stack_call"] = lambda *a: ran.append(real(*a) is not None) or real(*a)
        with torch.set_grad_enabled(grad.get("grad", False)):
            got = module(*args)
        assert (len(ran) > 0 and ran[-1]) == took
        ran.clear()
        with torch.no_grad():
            want = module.to_dense()(*args)
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=2e-2 if grad.get("lossy") else 2e-5)
        return got

    frame(x, hx, took=False)  # the first frame builds it
    frame(x, hx, took=True)
    frame(x[:, 0], tuple(t[:, 0] for t in hx), took=True)  # unbatched
    with torch.no_grad():
        weight.mul_(0.5)  # in place (an optimizer step): read as it is
    frame(x, hx, took=True)
    weight.data = weight.data * 2.0  # re-pointed: the Python path, which makes it anew
    frame(x, hx, took=False)
    frame(x, hx, took=True)
    if kind == "sparse":
        with torch.no_grad():
            module.col_indices_l0.add_(0)  # the pattern written in place: checked again, anew
        frame(x, hx, took=False)
        frame(x, None, took=True)
        saved = module.col_indices_l0.clone()
        with torch.no_grad():
            before = module(x, hx)[0]
        module.col_indices_l0.data.fill_(10**6)  # out of range, through .data: no version moves, so the call runs
        with torch.no_grad():                     # on its checked copy of the pattern, never on this
            torch.testing.assert_close(module(x, hx)[0], before, rtol=0, atol=0)
        ak.weights_changed()  # as README says after such writes: the Python path checks the pattern, and refuses it
        with torch.no_grad(), pytest.raises(ValueError, match="col_indices"):
            module(x, hx)
        with torch.no_grad():
            module.col_indices_l0.copy_(saved)
        frame(x, hx, took=False)
    assert frame(x, hx, took=False, grad=True)[0].requires_grad  # autograd: the graph the Python path builds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frame(x, hx, took=False, lossy=True)[0].dtype == torch.bfloat16
    with ak.use_backend("reference"):
        frame(x, hx, took=False)
        assert ak.last_face("lowrank_lstm_sequence" if kind == "lowrank" else "bsr_linear") == "reference"
    frame(torch.randn(2, 2, 32), hx, took=False)  # two frames
    for wide in (16, 40):  # another width: the block-sparse step takes D from x, and it ran such frames (was)
        for inp in (torch.randn(1, 2, wide), torch.randn(1, wide)):
            with torch.no_grad(), pytest.raises(ValueError, match=r"input.shape\[-1\] must be input_size = 32"):
                module(inp, hx if inp.dim() == 3 else None)
    with pytest.raises(ValueError, match="h_0"):
        frame(x, (hx[0][:, :1], hx[1]), took=False)
    twin = copy.deepcopy(module)
    assert "_stack_call" not in twin.__dict__ and "_stack_call" in module.__dict__
    buffer = io.BytesIO()
    torch.save(module, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        for copied in (twin, loaded):
            (copied.w_ih_u_l0 if kind == "lowrank" else copied.values_l0).mul_(3.0)
            torch.testing.assert_close(copied(x, hx)[0], copied.to_dense()(x, hx)[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(module(x, hx)[0], module.to_dense()(x, hx)[0], rtol=0, atol=2e-5)


def test_low_rank_modules_load_a_checkpoint_of_other_ranks():
    """A fractional rank (lstm_rank=0.9) picks ranks from the weights, so a model swapped anew before loading has
    other ones than the trained checkpoint: the factors take the saved shapes (as BlockSparseLSTM takes a saved
    pattern); it was a size mismatch. A checkpoint of another layer shape is still one (the ranks stay)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)
        trained = LowRankLSTM(12, 16, rank=3, num_layers=2, bidirectional=True, proj_size=5)
        fresh = LowRankLSTM(12, 16, rank=7, num_layers=2, bidirectional=True, proj_size=5)
        cell, fresh_cell = LowRankLSTMCell(12, 16, rank=3, rank_hh=2), LowRankLSTMCell(12, 16, rank=8)
    fresh.load_state_dict(trained.state_dict())
    fresh_cell.load_state_dict(cell.state_dict())
    assert fresh.ranks == trained.ranks and fresh_cell.ranks == (3, 2)
    x = torch.randn(4, 2, 12)
    with torch.no_grad():
        for got, want in zip(torch.utils._pytree.tree_leaves(fresh(x)), torch.utils._pytree.tree_leaves(trained(x))):
            assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(fresh_cell(x[0]), cell(x[0])))
        other = LowRankLSTMCell(12, 20, rank=4)  # another hidden size: a size mismatch, as nn.LSTMCell's
        with pytest.raises(RuntimeError, match="size mismatch for w_ih_u"):
            other.load_state_dict(cell.state_dict())
        assert other.ranks == (4, 4) and other.w_ih_u.shape == (80, 4)


@pytest.mark.parametrize("kind", ["lowrank", "sparse", "cell"])
def test_input_of_another_dtype_than_the_weights_is_named_by_the_module(kind):
    # Was named by whichever op met it first ("bsr_lstm_cell_forward: values has dtype ...", "PreparedBsrLstmCell:
    # x must be ...", "lowrank_lstm_cell: w_ih_u has dtype ..."), differently on each path.
    torch.manual_seed(0)
    module = (LowRankLSTMCell.from_lstm_cell(nn.LSTMCell(32, 32), rank=8) if kind == "cell" else
              LowRankLSTM.from_lstm(nn.LSTM(32, 32, 2), rank=8) if kind == "lowrank" else
              BlockSparseLSTM.from_lstm(nn.LSTM(32, 32, 2), sparsity=0.5, block_size=16)).to(DEVICE)
    name = type(module).__name__
    inputs = [torch.randn(3, 32, dtype=torch.float64, device=DEVICE)]
    if kind != "cell":
        inputs += [torch.randn(1, 3, 32, dtype=torch.float64, device=DEVICE),
                   torch.randn(5, 3, 32, dtype=torch.float64, device=DEVICE),
                   nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 32, dtype=torch.float64, device=DEVICE),
                                                     torch.tensor([5, 3, 1]))]
    for grad in (True, False):
        for x in inputs:
            with torch.set_grad_enabled(grad), pytest.raises(
                    TypeError, match=rf"^{name}: input must have the weights' dtype torch.float32 \(or run under "
                                     r"torch.autocast\); got torch.float64$"):
                module(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the autocast dtype differs from the weights' by design
        assert module(torch.randn(3, 32, device=DEVICE).bfloat16())[0].dtype == torch.bfloat16


def test_the_cells_missing_dense_weights_say_where_they_are():
    cell = LowRankLSTMCell.from_lstm_cell(nn.LSTMCell(8, 8), rank=2)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # was a bare "'LowRankLSTMCell' object has no ..."
        with pytest.raises(AttributeError, match=rf"LowRankLSTMCell has no '{name}'.*to_dense\(\) gives"):
            getattr(cell, name)
    with pytest.raises(AttributeError, match="'LowRankLSTMCell' object has no attribute 'nothing'"):
        cell.nothing


@pytest.mark.parametrize("kind", ["lowrank", "sparse", "cell"])
def test_reset_parameters_draws_every_parameter_anew_in_place(kind):
    """As nn.LSTM / nn.LSTMCell.reset_parameters: the same parameter objects, drawn anew (ranks and pattern kept,
    at nn.LSTM's weight scale: see the constructors), and the native inference paths follow (the sparse split
    and stack call are caches); `mode` is nn.LSTM's."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)
        module = {"lowrank": lambda: LowRankLSTM(24, 32, rank=8, num_layers=2, proj_size=8),
                  "sparse": lambda: BlockSparseLSTM(24, 32, num_layers=2, block_size=16, sparsity=0.5, proj_size=8),
                  "cell": lambda: LowRankLSTMCell(24, 32, rank=8)}[kind]().eval()
    x = torch.randn(1, 2, 24) if kind != "cell" else torch.randn(2, 24)
    with torch.no_grad():
        module(x), module(x)  # the native paths built
    params = dict(module.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    pattern = [b.clone() for b in module.buffers()]
    module.reset_parameters()
    assert dict(module.named_parameters()) == params  # the same objects
    assert all(not torch.equal(p, before[name]) for name, p in params.items())
    assert all(torch.equal(b, old) for b, old in zip(module.buffers(), pattern))
    bound = 1 / math.sqrt(32)
    for name, p in params.items():
        if name.startswith(("values", "w_hr")):
            assert p.abs().max() <= bound
        if name.startswith("bias"):
            assert p.abs().max() <= (2 if kind == "sparse" else 1) * bound  # (sparse: nn.LSTM's two biases summed)
    with torch.no_grad():
        got, want = module(x), module.to_dense()(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-5)
    if kind != "cell":
        assert module.mode == "LSTM" == nn.LSTM(2, 2).mode
