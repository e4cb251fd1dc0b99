"""swap_in: replacing nn.LSTM / nn.Linear / torchaudio RNNTLoss inside an existing model."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torchaudio
from torch import nn

import amnets_kernels as ak
from amnets_kernels.nn import (BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell, NotCheaperWarning,
                              RNNTLoss, SmallLayerWarning)


class TinyTransducer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(12, 16, num_layers=2)
        self.predictor = nn.LSTM(8, 16)
        self.embed = nn.Embedding(5, 8)
        self.joint = nn.Linear(16, 5)
        self.loss = torchaudio.transforms.RNNTLoss(blank=0)

    def forward(self, feats, labels):
        enc = self.encoder(feats)[0].transpose(0, 1)  # (B, T, H)
        pred_in = nn.functional.pad(self.embed(labels), (0, 0, 1, 0))  # blank-prefixed, (B, U+1, 8)
        pred = self.predictor(pred_in.transpose(0, 1))[0].transpose(0, 1)
        return self.joint(torch.tanh(enc[:, :, None] + pred[:, None]))


def inputs():
    torch.manual_seed(1)
    return torch.randn(7, 2, 12), torch.randint(1, 5, (2, 3))


def test_full_rank_and_no_sparsity_change_nothing():
    model = TinyTransducer()
    feats, labels = inputs()
    before = model(feats, labels)
    with pytest.warns(NotCheaperWarning):  # full rank and sparsity 0 cost more than dense: asked for anyway
        swapped, report = ak.swap_in(model, lstm_rank=10**6, linear_sparsity=0.0, block_size=4, return_report=True,
                                     only_if_cheaper=False)
    with ak.use_backend("reference"):
        after = swapped(feats, labels)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    kinds = {r["name"]: (r["from"], r["to"]) for r in report.replaced}
    assert kinds == {"encoder": ("LSTM", "LowRankLSTM"), "predictor": ("LSTM", "LowRankLSTM"),
                     "joint": ("Linear", "BlockSparseLinear"), "loss": ("RNNTLoss", "RNNTLoss")}
    assert isinstance(swapped.loss, RNNTLoss) and swapped.loss.blank == 0
    assert "total" in str(report)


def test_patterns_and_report_counts():
    model = TinyTransducer()
    swapped, report = ak.swap_in(model, lstm_rank=4, linear_sparsity=0.5, block_size=4, include="encoder*",
                                 loss=False, return_report=True, only_if_cheaper=False)
    assert isinstance(swapped.encoder, LowRankLSTM) and type(swapped.predictor) is nn.LSTM
    assert type(swapped.joint) is nn.Linear
    (entry,) = report.replaced
    assert entry["macs_before"] == 4 * 16 * (12 + 16) + 4 * 16 * (16 + 16)
    assert entry["macs_after"] == swapped.encoder.macs_per_frame() < entry["macs_before"]
    assert report.params_after < report.params_before
    again = ak.swap_in(TinyTransducer(), linear_sparsity=0.5, block_size=4, exclude=["joint"],
                       only_if_cheaper=False)  # (blocks of 4 have no fast kernel: not why joint stays)
    assert type(again.joint) is nn.Linear


def test_swapped_model_trains_and_round_trips():
    # Blocks of 4 have no fast kernel (only_if_cheaper would keep the joint dense): exact, asked for anyway.
    model = ak.swap_in(TinyTransducer(), lstm_rank=4, linear_sparsity=0.5, block_size=4, only_if_cheaper=False)
    feats, labels = inputs()
    with ak.use_backend("reference"):
        logits = model(feats, labels)
        loss = model.loss(logits, labels.int(), torch.tensor([7, 7], dtype=torch.int32),
                          torch.tensor([3, 3], dtype=torch.int32))
        loss.backward()
    assert isinstance(model.joint, BlockSparseLinear) and model.joint.values.grad is not None
    assert model.encoder.w_hh_u_l0.grad is not None
    fresh = ak.swap_in(TinyTransducer(), lstm_rank=4, linear_sparsity=0.5, block_size=4, only_if_cheaper=False)
    fresh.load_state_dict(model.state_dict())
    with ak.use_backend("reference"):
        torch.testing.assert_close(fresh(feats, labels), model(feats, labels))


def test_root_module_can_be_swapped():
    lstm = nn.LSTM(8, 8)
    swapped = ak.swap_in(lstm, lstm_rank=2)
    assert isinstance(swapped, LowRankLSTM)


def test_layers_that_would_not_pay_are_kept_and_reported():
    def model():
        return nn.Sequential(nn.Linear(64, 32), nn.Linear(256, 256), nn.LSTM(64, 64), nn.LSTM(256, 256))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # swap_in says it in the report, not by warnings
        swapped, report = ak.swap_in(model(), lstm_rank=56, linear_sparsity=0.75, return_report=True)
    assert type(swapped[0]) is nn.Linear and isinstance(swapped[1], BlockSparseLinear)
    assert type(swapped[2]) is nn.LSTM and isinstance(swapped[3], LowRankLSTM)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert "keeps no block" in reasons["0"]  # 64 x 32 in blocks of 32 at 0.75: 0.5 of 2 blocks rounds to 0
    assert "no fewer than the dense layer's 32,768" in reasons["2"]  # rank 56 at H = 64: 35,840 MACs
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    assert "kept as they are (2)" in str(report)
    with pytest.raises(ValueError, match=r"strict=True.*\n  0 \(Linear\): .*keeps no block"):
        ak.swap_in(model(), lstm_rank=56, linear_sparsity=0.75, strict=True)
    small = ak.swap_in(model(), linear_sparsity=0.5, min_macs=10**4, return_report=True)[1]
    assert [r["name"] for r in small.replaced] == ["1"] and "below min_macs" in small.skipped[0]["reason"]
    padded = ak.swap_in(nn.Linear(40, 40), linear_sparsity=0.0, block_size=32, return_report=True)[1]
    assert "4,096 MACs per frame, no fewer than the dense layer's 1,600" in padded.skipped[0]["reason"]


def test_every_recurrent_kind_is_swapped_or_reported():
    model = nn.ModuleDict(dict(bi=nn.LSTM(32, 64, num_layers=2, bidirectional=True, dropout=0.3),
                               proj=nn.LSTM(32, 64, proj_size=16), cell=nn.LSTMCell(32, 64), gru=nn.GRU(32, 64)))
    low, report = ak.swap_in(copy.deepcopy(model), lstm_rank=8, return_report=True)
    assert isinstance(low["bi"], LowRankLSTM) and low["bi"].bidirectional and low["bi"].dropout == 0.3
    assert isinstance(low["proj"], LowRankLSTM) and low["proj"].proj_size == 16
    assert isinstance(low["cell"], LowRankLSTMCell) and type(low["gru"]) is nn.GRU
    assert report.skipped == [dict(name="gru", **{"from": "GRU"}, reason="nn.GRU has no amnets counterpart (LSTMs only)")]
    sparse, report = ak.swap_in(copy.deepcopy(model), lstm_sparsity=0.75, block_size=16, return_report=True)
    assert isinstance(sparse["bi"], BlockSparseLSTM) and isinstance(sparse["proj"], BlockSparseLSTM)
    assert sparse["proj"].proj_size == 16 and {s["name"] for s in report.skipped} == {"cell", "gru"}
    x = torch.randn(5, 2, 32)
    with torch.no_grad():
        for name in ("bi", "proj"):
            module = sparse[name].eval()  # no dropout
            torch.testing.assert_close(module(x)[0], module.to_dense()(x)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lstm_rank .* or lstm_sparsity .*not both"):
        ak.swap_in(model, lstm_rank=8, lstm_sparsity=0.5)


def test_unswap_gives_plain_modules_and_dense_state_dicts():
    model = TinyTransducer()
    feats, labels = inputs()
    swapped = ak.swap_in(copy.deepcopy(model), lstm_rank=4, linear_sparsity=0.5, block_size=4,
                         only_if_cheaper=False)  # blocks of 4: no fast kernel, asked for anyway
    with ak.use_backend("reference"):
        expected = swapped(feats, labels)
    dense, report = ak.unswap(swapped, return_report=True)
    assert type(dense.encoder) is nn.LSTM and type(dense.joint) is nn.Linear
    assert type(dense.loss) is torchaudio.transforms.RNNTLoss
    assert {r["name"] for r in report.replaced} == {"encoder", "predictor", "joint", "loss"}
    torch.testing.assert_close(dense(feats, labels), expected, rtol=0, atol=1e-5)
    model.load_state_dict(dense.state_dict())  # the multiplied-out weights load into the original model
    torch.testing.assert_close(model(feats, labels), expected, rtol=0, atol=1e-5)


def test_a_meta_model_is_refused_naming_the_reason():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"0 \(Linear\) has its weights on the meta device.*materialise"):
        ak.swap_in(model, linear_sparsity=0.5)
    assert ak.swap_in(model, lstm_rank=4) is model  # nothing to factor: nothing read


class SharedAndTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(64, 64)
        self.seq = nn.Sequential(nn.Linear(64, 64), self.shared)  # one module at two places
        self.pair = nn.ModuleList([nn.Sequential(nn.Linear(64, 64))] * 2)  # a shared container: 4 names

    def forward(self, x):
        return self.pair[1](self.pair[0](self.shared(self.seq(x))))


def test_a_module_at_several_places_is_replaced_everywhere_by_one_module():
    torch.manual_seed(0)
    model, x = SharedAndTied(), torch.randn(3, 64)
    with pytest.warns(NotCheaperWarning):  # sparsity 0: exact, and asked for anyway
        swapped, report = ak.swap_in(copy.deepcopy(model), linear_sparsity=0.0, block_size=16, return_report=True,
                                     only_if_cheaper=False)
    assert isinstance(swapped.shared, BlockSparseLinear) and swapped.seq[1] is swapped.shared
    assert isinstance(swapped.pair[0][0], BlockSparseLinear) and swapped.pair[1] is swapped.pair[0]
    assert [(r["name"], r.get("also")) for r in report.replaced] == [
        ("shared", ["seq.1"]), ("seq.0", None), ("pair.0.0", ["pair.1.0"])]
    assert "shared (also seq.1)" in str(report)
    assert report.params_before == 3 * (64 * 64 + 64)  # each module counted once
    with ak.use_backend("reference"):
        torch.testing.assert_close(swapped(x), model(x), rtol=0, atol=1e-5)
    dense, back = ak.unswap(swapped, return_report=True)
    assert type(dense.shared) is nn.Linear and dense.seq[1] is dense.shared
    assert type(dense.pair[0][0]) is nn.Linear and dense.pair[1] is dense.pair[0]
    assert [(r["name"], r.get("also")) for r in back.replaced] == [(r["name"], r.get("also")) for r in report.replaced]
    torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-5)
    # Patterns that want one of its places but not another: left as it is (replacing it would change both).
    kept, report = ak.swap_in(SharedAndTied(), linear_sparsity=0.5, block_size=16, exclude="seq.1",
                              return_report=True)
    assert type(kept.shared) is nn.Linear and kept.seq[1] is kept.shared and isinstance(kept.seq[0], BlockSparseLinear)
    assert "it is also seq.1, which include / exclude leave out" in report.skipped[0]["reason"]
    with pytest.raises(ValueError, match=r"strict=True.*\n  shared \(also seq.1\) \(Linear\): it is also seq.1"):
        ak.swap_in(SharedAndTied(), linear_sparsity=0.5, block_size=16, exclude="seq.1", strict=True)


def test_layers_with_tied_weights_are_kept_and_reported():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(64, 64), nn.Linear(64, 64, bias=False)
            self.out.weight = self.emb.weight  # weight tying, as in language models
            self.lstm, self.cell = nn.LSTM(32, 32), nn.LSTMCell(32, 32)
            self.cell.weight_hh = self.lstm.weight_hh_l0

    model, report = ak.swap_in(Tied(), linear_sparsity=0.5, lstm_rank=4, block_size=16, return_report=True)
    assert type(model.out) is nn.Linear and model.out.weight is model.emb.weight
    assert type(model.lstm) is nn.LSTM and type(model.cell) is nn.LSTMCell
    assert model.cell.weight_hh is model.lstm.weight_hh_l0 and not report.replaced
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["out"].startswith("its weight is shared with emb.weight (tied weights)")
    assert reasons["lstm"].startswith("its weight_hh_l0 is shared with cell.weight_hh")
    assert reasons["cell"].startswith("its weight_hh is shared with lstm.weight_hh_l0")
    with pytest.raises(ValueError, match=r"strict=True.*\n  out \(Linear\): its weight is shared with emb.weight"):
        ak.swap_in(Tied(), linear_sparsity=0.5, block_size=16, strict=True)


def test_hooks_and_parametrizations_are_kept_and_reported():
    def model():
        layers = nn.ModuleDict({k: nn.Linear(64, 64) for k in ("fwd", "pre", "bwd", "param", "pruned", "plain")})
        layers["fwd"].register_forward_hook(lambda *args: None)
        layers["pre"] = nn.utils.spectral_norm(layers["pre"])  # a forward pre-hook on weight_orig
        layers["bwd"].register_full_backward_hook(lambda *args: None)
        torch.nn.utils.parametrize.register_parametrization(layers["param"], "weight", nn.Identity())
        mask = torch.zeros(64, 64)
        mask[:32] = 1  # half the blocks: the prune hook's mask is carried over, so that hook is no reason
        torch.nn.utils.prune.custom_from_mask(layers["pruned"], "weight", mask)
        return layers

    swapped, report = ak.swap_in(model(), linear_sparsity=0.5, block_size=16, return_report=True)
    assert [r["name"] for r in report.replaced] == ["pruned", "plain"] and swapped["pruned"].values.shape[0] == 8
    assert all(type(swapped[k]).__name__.endswith("Linear") and not isinstance(swapped[k], BlockSparseLinear)
               for k in ("fwd", "pre", "bwd", "param"))
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["fwd"] == "it has forward hook <lambda>; a replacement would drop them"
    assert reasons["pre"].startswith("it has forward pre-hook SpectralNorm")
    assert "backward hook" in reasons["bwd"]
    assert report.skipped[3] == dict(name="param", **{"from": "ParametrizedLinear"}, reason=(
        "its weight is parametrized (torch.nn.utils.parametrize); a replacement would drop the parametrization"))
    with pytest.raises(ValueError, match=r"strict=True.*\n  fwd \(Linear\): it has forward hook"):
        ak.swap_in(model(), linear_sparsity=0.5, block_size=16, strict=True)
    lstm = nn.LSTM(32, 32)
    lstm.register_forward_pre_hook(lambda *args: None)
    assert ak.swap_in(lstm, lstm_rank=4) is lstm
    # unswap likewise: a hook on a swapped module would be lost with it.
    swapped["plain"].register_forward_hook(lambda *args: None)
    dense, report = ak.unswap(swapped, return_report=True)
    assert type(dense["pruned"]) is nn.Linear and isinstance(dense["plain"], BlockSparseLinear)
    assert report.skipped == [dict(name="plain", **{"from": "BlockSparseLinear"},
                                   reason="it has forward hook <lambda>; a replacement would drop them")]


def test_gradient_hooks_and_a_forward_set_on_the_instance_are_kept_and_reported():
    """A hook on a parameter tensor, and a forward replaced on the instance (accelerate's hooks, adapters) are
    part of what a module does as much as its module hooks: both were dropped silently."""
    model = nn.ModuleDict(dict(grad=nn.Linear(64, 64), post=nn.LSTM(32, 32), fwd=nn.Linear(64, 64),
                               plain=nn.Linear(64, 64)))
    model["grad"].weight.register_hook(lambda g: g * 0)
    model["post"].weight_hh_l0.register_post_accumulate_grad_hook(lambda p: None)
    original = model["fwd"].forward
    model["fwd"].forward = lambda x: original(x) * 2
    swapped, report = ak.swap_in(model, linear_sparsity=0.5, lstm_rank=4, block_size=16, return_report=True)
    assert [r["name"] for r in report.replaced] == ["plain"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["grad"] == "it has a gradient hook on weight; a replacement would drop them"
    assert reasons["post"] == "it has a gradient hook on weight_hh_l0; a replacement would drop them"
    assert reasons["fwd"] == ("its forward is replaced on the instance (module.forward = ...); a replacement would "
                              "drop it")


def test_a_pruned_layer_is_swapped_with_its_weights_of_now_not_of_the_last_forward():
    """prune's `weight` is weight_orig * mask as of the last forward: after an optimizer step it is stale. The
    replacement was built from it (at sparsity 0 / full rank the swapped model differed by ~100 after one SGD
    step, silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LSTM(64, 32))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch.nn.utils.prune.l1_unstructured(model[1], "weight_ih_l0", amount=0.5)
    x = torch.randn(5, 1, 64)
    model(x)[0].pow(2).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # weight_orig moved; `weight` is still that of before
    with torch.no_grad():  # what the model computes now (not calling it: its forward would refresh `weight`)
        inp = nn.functional.linear(x, model[0].weight_orig * model[0].weight_mask, model[0].bias)
        lstm = nn.LSTM(64, 32)
        lstm.load_state_dict({k: getattr(model[1], k) for k in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
                             | {"weight_ih_l0": model[1].weight_ih_l0_orig * model[1].weight_ih_l0_mask})
        want = lstm(inp)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)
        swapped = ak.swap_in(model, linear_sparsity=0.0, lstm_rank=10**6, block_size=16, only_if_cheaper=False)
    assert isinstance(swapped[0], BlockSparseLinear) and isinstance(swapped[1], LowRankLSTM)
    torch.testing.assert_close(swapped(x)[0], want, atol=1e-4, rtol=1e-4)


def test_scripted_layers_are_reported_not_ignored():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(16, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated: still in use
        model = nn.Sequential(torch.jit.script(Encoder()), nn.Linear(32, 32))
    swapped, report = ak.swap_in(model, linear_sparsity=0.5, lstm_rank=4, block_size=16, return_report=True,
                                 strict=True)  # never targets: strict does not count them
    assert [r["name"] for r in report.replaced] == ["1"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons == {f"0.{name}": (f"a TorchScript {kind} (torch.jit.script): its compiled code calls it, so it "
                                     "cannot be replaced; call swap_in before scripting")
                       for name, kind in (("lstm", "LSTM"), ("fc", "Linear"))}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(include=3), TypeError, "include must be a str or an iterable of str .*; got int"),
    (dict(exclude=["a", 1]), TypeError, "exclude must be .*; got a list holding int 1"),
    (dict(linear_sparsity=1.5), ValueError, r"linear_sparsity must be a float in \[0, 1\]; got 1.5"),
    (dict(linear_sparsity="0.5"), TypeError, "linear_sparsity must be a float .*; got str"),
    (dict(lstm_sparsity=float("nan")), ValueError, "lstm_sparsity must be a float in .*; got nan"),
    (dict(lstm_rank=0), ValueError, r"lstm_rank must be an int >= 1 or a float in \(0, 1\].*; got 0"),
    (dict(lstm_rank=2.5), ValueError, "lstm_rank must be .*; got 2.5"),
    (dict(lstm_rank=True), TypeError, "lstm_rank must be .*; got bool"),
    (dict(block_size=0), ValueError, "block_size must be an int >= 1; got 0"),
    (dict(block_size=16.0), TypeError, "block_size must be an int >= 1; got float"),
    (dict(min_macs=-1), ValueError, "min_macs must be an int >= 0; got -1"),
    (dict(strict="no"), TypeError, "strict must be a bool; got str"),
    (dict(loss=1), TypeError, "loss must be a bool; got int"),
])
def test_arguments_are_checked_up_front_under_their_own_names(kwargs, error, match):
    for model in (nn.Identity(), nn.Linear(64, 64)):  # whatever the model holds
        with pytest.raises(error, match=f"^swap_in: {match}"):
            ak.swap_in(model, **kwargs)


def test_numpy_numbers_are_accepted_and_models_type_checked():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.LSTM(64, 64))

    plain = ak.swap_in(model(), linear_sparsity=0.5, lstm_sparsity=0.5, block_size=16)
    numpy = ak.swap_in(model(), linear_sparsity=np.float32(0.5), lstm_sparsity=np.float64(0.5),
                       block_size=np.int64(16))
    assert isinstance(numpy[0], BlockSparseLinear) and isinstance(numpy[1], BlockSparseLSTM)
    for a, b in zip(plain.state_dict().values(), numpy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ak.swap_in(nn.LSTM(64, 64), lstm_rank=np.int64(4)).w_ih_u_l0.shape == (256, 4)
    with pytest.raises(TypeError, match="swap_in: model must be an nn.Module; got dict"):
        ak.swap_in({}, linear_sparsity=0.5)
    with pytest.raises(TypeError, match="unswap: model must be an nn.Module; got dict"):
        ak.unswap({})


@pytest.mark.filterwarnings("ignore")  # small layers: not cheaper than dense
@pytest.mark.parametrize("frozen", ["all", "biases", "none"])
@pytest.mark.parametrize("kwargs", [dict(lstm_rank=4), dict(lstm_rank=0.5), dict(lstm_sparsity=0.5)],
                         ids=["rank", "energy", "sparsity"])
def test_frozen_parameters_stay_frozen_through_swap_in_and_unswap(frozen, kwargs):
    """Every new parameter trains only if those it is made from did (a frozen encoder, or frozen biases alone),
    both ways: swap_in, then unswap (each module's to_dense)."""
    model = nn.ModuleDict(dict(lstm=nn.LSTM(32, 32, num_layers=2, bidirectional=True), proj=nn.LSTM(32, 32, proj_size=8),
                               cell=nn.LSTMCell(32, 32), linear=nn.Linear(32, 32)))
    trains = lambda name: frozen == "none" or (frozen == "biases" and "bias" not in name)  # noqa: E731

    def check():
        assert {n: p.requires_grad for n, p in model.named_parameters()} == \
               {n: trains(n) for n, _ in model.named_parameters()}

    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    ak.swap_in(model, linear_sparsity=0.5, block_size=16, only_if_cheaper=False, **kwargs)
    kinds = {LowRankLSTM, LowRankLSTMCell} if "lstm_rank" in kwargs else {BlockSparseLSTM}
    assert kinds | {BlockSparseLinear} <= {type(m) for m in model.values()}
    check()
    ak.unswap(model)
    assert all(type(m) in (nn.LSTM, nn.LSTMCell, nn.Linear) for m in model.values())
    check()


class EncoderAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), nn.Linear(64, 64)

    def forward(self, x, mask=None):
        return self.head(self.encoder(x, src_key_padding_mask=mask))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the encoder's fast path
def test_linears_whose_parent_reads_their_weight_are_kept_and_reported():
    """nn.TransformerEncoderLayer's fused inference path (and nn.TransformerEncoder's, through its first layer)
    reads linear1 / linear2.weight, nn.MultiheadAttention's forward out_proj.weight: those stay dense."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 64), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    dense = copy.deepcopy(layer)
    swapped, report = ak.swap_in(layer, linear_sparsity=0.5, block_size=16, return_report=True)
    assert not report.replaced and type(swapped.linear1) is nn.Linear and type(swapped.linear2) is nn.Linear
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["linear1"] == ("its parent (TransformerEncoderLayer) reads linear1.weight in its fused inference "
                                  "path (eval mode, torch._transformer_encoder_layer_fwd); a BlockSparseLinear has no "
                                  "dense weight")
    # (MultiheadAttention's out_proj is a subclass of nn.Linear, never a target: listed, and strict does not count it)
    assert reasons["self_attn.out_proj"].startswith("NonDynamicallyQuantizableLinear subclasses nn.Linear")
    with pytest.raises(ValueError, match=r"strict=True.*\n  linear1 \(Linear\): its parent") as refused:
        ak.swap_in(copy.deepcopy(dense), linear_sparsity=0.5, block_size=16, strict=True)
    assert "out_proj" not in str(refused.value)
    ak.swap_in(nn.ModuleDict(dict(attention=nn.MultiheadAttention(64, 4), head=nn.Linear(64, 64))),
               linear_sparsity=0.5, block_size=16, strict=True)
    for train in (True, False):
        for grad in (True, False):  # without grad the eval forward takes the fused path
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(swapped.train(train)(x), dense.train(train)(x), rtol=0, atol=0)

    model = EncoderAndHead()
    dense = copy.deepcopy(model)
    swapped, report = ak.swap_in(model, linear_sparsity=0.5, block_size=16, return_report=True)
    assert [r["name"] for r in report.replaced] == ["head"] and isinstance(swapped.head, BlockSparseLinear)
    assert {s["name"] for s in report.skipped} == {f"encoder.layers.{i}.{n}" for i in (0, 1)
                                                   for n in ("linear1", "linear2", "self_attn.out_proj")}
    for train in (True, False):
        with torch.no_grad():  # eval with a padding mask: the encoder's nested-tensor fast path
            got = swapped.train(train)(x, mask)
            torch.testing.assert_close(got, swapped.head(dense.train(train).encoder(x, src_key_padding_mask=mask)),
                                       rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_layers_and_blocks_larger_than_a_layer_are_kept_before_anything_is_allocated():
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 0), nn.Linear(8, 8), nn.Linear(64, 64))
    swapped, report = ak.swap_in(model, linear_sparsity=0.5, block_size=16, return_report=True)
    assert [r["name"] for r in report.replaced] == ["3"] and isinstance(swapped[3], BlockSparseLinear)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["0"] == "an empty layer (8 x 0, out x in): nothing to prune"
    assert reasons["1"] == "an empty layer (0 x 8, out x in): nothing to prune"
    assert reasons["2"] == ("block_size 16 is larger than the layer (8 x 8, out x in): one padded block would cost "
                            "more than the whole layer")
    # b * b = 10**18 entries: refused by its size, even when asked to swap what does not pay.
    huge = nn.ModuleDict(dict(linear=nn.Linear(64, 64), lstm=nn.LSTM(8, 8)))
    kept, report = ak.swap_in(huge, linear_sparsity=0.5, lstm_sparsity=0.5, block_size=10**9, only_if_cheaper=False,
                              return_report=True)
    assert not report.replaced and type(kept["linear"]) is nn.Linear and type(kept["lstm"]) is nn.LSTM
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["linear"].startswith("block_size 1000000000 is larger than the layer (64 x 64, out x in)")
    assert reasons["lstm"].startswith("block_size 1000000000 is larger than the layer (32 x 16, [W_ih | W_hh])")


def test_subclasses_and_uninitialized_lazy_layers_are_reported_not_ignored():
    class MyLinear(nn.Linear):
        pass

    class MyLSTM(nn.LSTM):
        pass

    class MyCell(nn.LSTMCell):
        pass

    model = nn.ModuleDict(dict(sub=MyLinear(64, 64), lazy=nn.LazyLinear(64), lstm=MyLSTM(32, 32), cell=MyCell(32, 32),
                               plain=nn.Linear(64, 64)))
    swapped, report = ak.swap_in(model, linear_sparsity=0.5, lstm_rank=4, block_size=16, return_report=True)
    assert [r["name"] for r in report.replaced] == ["plain"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    only = "swap_in replaces exact nn.Linear / nn.LSTM / nn.LSTMCell only"
    assert reasons["sub"] == f"MyLinear subclasses nn.Linear; {only} (a subclass may compute more than its base)"
    assert reasons["lstm"].startswith(f"MyLSTM subclasses nn.LSTM; {only}")
    assert reasons["cell"].startswith(f"MyCell subclasses nn.LSTMCell; {only}")
    assert reasons["lazy"] == ("an uninitialized LazyLinear has no weight yet (run a forward first: it then becomes "
                               f"the plain module); {only}")
    swapped["lazy"](torch.randn(2, 64))  # materialised: now an nn.Linear, and swapped
    assert isinstance(ak.swap_in(swapped, linear_sparsity=0.5, block_size=16)["lazy"], BlockSparseLinear)


def test_a_pattern_that_matches_no_layer_warns_naming_it():
    for kwargs, pattern in ((dict(include="encodr*"), "include pattern 'encodr\\*'"),
                            (dict(include=["joint", "predictr"]), "include pattern 'predictr'"),
                            (dict(exclude="jiont"), "exclude pattern 'jiont'"),
                            (dict(include="encoder"), "include pattern 'encoder'")):  # an LSTM: not a target here
        with pytest.warns(UserWarning, match=f"swap_in: {pattern} matches no layer these settings replace"):
            ak.swap_in(TinyTransducer(), linear_sparsity=0.5, block_size=16, only_if_cheaper=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.swap_in(TinyTransducer(), lstm_rank=4, include="encoder", exclude="predictor")  # both match: silent


def test_block_sizes_and_dtypes_without_a_fast_kernel_are_kept_where_only_cheaper_is_asked():
    torch.manual_seed(0)
    fast = "(fast: block sizes 16, 32, 64; dtypes torch.bfloat16, torch.float32)"
    kept, report = ak.swap_in(nn.Sequential(nn.Linear(256, 256)), linear_sparsity=0.75, block_size=8,
                              return_report=True)
    assert type(kept[0]) is nn.Linear and report.skipped[0]["reason"] == (
        f"the cpu face has no SIMD kernel for block size 8 {fast}; its exact generic path is slower than the "
        "dense layer")
    fp64 = nn.ModuleDict(dict(linear=nn.Linear(256, 256), lstm=nn.LSTM(64, 64))).double()
    kept, report = ak.swap_in(fp64, linear_sparsity=0.75, lstm_sparsity=0.75, block_size=32, return_report=True)
    assert not report.replaced and all(f"for dtype torch.float64 {fast}" in s["reason"] for s in report.skipped)
    with pytest.raises(ValueError, match="strict=True.*\n  0 \\(Linear\\): the cpu face has no SIMD kernel for block"):
        ak.swap_in(nn.Sequential(nn.Linear(256, 256)), linear_sparsity=0.75, block_size=8, strict=True)
    # Asked for anyway: swapped, and exact.
    x = torch.randn(3, 256, dtype=torch.float64)
    swapped = ak.swap_in(fp64, linear_sparsity=0.75, lstm_sparsity=0.75, block_size=32, only_if_cheaper=False)
    assert isinstance(swapped["linear"], BlockSparseLinear) and isinstance(swapped["lstm"], BlockSparseLSTM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module says once per process that this runs the generic path
        torch.testing.assert_close(swapped["linear"](x), swapped["linear"].to_dense()(x))


@pytest.mark.skipif(ak.unavailable_reason("bsr_linear", "triton", "cpu") is not None, reason="no Triton interpreter")
def test_block_sizes_the_triton_face_cannot_run_are_kept_under_it():
    """The Triton face has no generic path: a block size it has no kernel for raised at the first forward of a
    layer swap_in had replaced under it (the fast-kernel table had no entry for it)."""
    with ak.use_backend("triton"):
        kept, report = ak.swap_in(nn.Sequential(nn.Linear(256, 256)), linear_sparsity=0.75, block_size=128,
                                  return_report=True)
        assert type(kept[0]) is nn.Linear and report.skipped[0]["reason"] == (
            "the triton face has no kernel for block size 128 (it runs 1, 2, 4, 8, 16, 32, 64): the layer could not "
            "run there")
        swapped = ak.swap_in(nn.Sequential(nn.Linear(64, 64)), linear_sparsity=0.5, block_size=8)
        assert isinstance(swapped[0], BlockSparseLinear)  # block 8 runs there


def test_linears_too_small_to_gain_time_are_swapped_with_a_warning():
    """Fewer MACs is not less time below ~32K multiply-adds a row (a BlockSparseLinear call's host cost): a
    swapped small conformer ran 1.2x slower, silently. swap_in now says so, naming the layers and the fix."""
    model = lambda: nn.ModuleDict(dict(small=nn.Linear(128, 128), big=nn.Linear(256, 256)))  # noqa: E731
    with pytest.warns(SmallLayerWarning, match=r"1 Linear\(s\) under 32,768 multiply-adds a row \(small\).*"
                                               r"min_macs=32768 keeps such layers dense"):
        swapped = ak.swap_in(model(), linear_sparsity=0.75)
    assert isinstance(swapped["small"], BlockSparseLinear) and isinstance(swapped["big"], BlockSparseLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallLayerWarning)
        kept, report = ak.swap_in(model(), linear_sparsity=0.75, min_macs=32768, return_report=True)
        assert type(kept["small"]) is nn.Linear and "below min_macs" in report.skipped[0]["reason"]
        ak.swap_in(model(), linear_sparsity=0.75, only_if_cheaper=False)  # asked for whatever it costs


def test_block_sparse_lstms_swapped_in_train_mode_at_small_sizes_warn():
    """BlockSparseLSTM trains one fused cell a step from Python: slower than nn.LSTM to train below H=512."""
    with pytest.warns(SmallLayerWarning, match=r"0 \(in train mode, hidden_size < 512\) now BlockSparseLSTM"):
        ak.swap_in(nn.Sequential(nn.LSTM(128, 128)), lstm_sparsity=0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallLayerWarning)
        ak.swap_in(nn.Sequential(nn.LSTM(128, 128)).eval(), lstm_sparsity=0.75)  # inference: fast
        ak.swap_in(nn.Sequential(nn.LSTM(128, 128)), lstm_rank=16)


def test_swap_like_loads_a_swapped_checkpoint_into_a_fresh_dense_model():
    """A fractional lstm_rank picks ranks from the weights: swapped anew on fresh random weights (flat spectra)
    the LSTMs do not pay and stay dense, and the checkpoint of the trained, swapped model cannot load. swap_like
    swaps each layer into the kind the checkpoint holds there (the BlockSparseLSTM too, with its block size and
    a projection), and then it loads strictly and computes what the swapped model computes; frozen layers stay
    frozen, a layer it cannot replace is named, and a layer the checkpoint holds dense stays."""
    def model():
        return nn.ModuleDict(dict(enc=nn.LSTM(32, 64, 2), lstmp=nn.LSTM(32, 64, proj_size=16), cell=nn.LSTMCell(32, 64),
                                  sparse=nn.LSTM(32, 64, proj_size=16), out=nn.Linear(64, 64), keep=nn.Linear(8, 8)))
    torch.manual_seed(0)
    trained = model()
    with torch.no_grad():  # "trained" weights: low-rank structure, so the energy rank is small
        for name in ("enc", "lstmp", "cell"):
            for p in trained[name].parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape[0], 4) @ torch.randn(4, p.shape[1]) / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swapped = ak.swap_in(copy.deepcopy(trained), lstm_rank=0.97, linear_sparsity=0.5, block_size=16,
                             min_macs=1000, exclude="sparse")
        swapped["sparse"] = BlockSparseLSTM.from_lstm(trained["sparse"], sparsity=0.6, block_size=16)
        again = ak.swap_in(model(), lstm_rank=0.97, linear_sparsity=0.5, block_size=16, min_macs=1000)
    checkpoint = swapped.state_dict()
    assert type(again["enc"]) is nn.LSTM  # the pitfall swap_like is for
    with pytest.raises(RuntimeError, match="Missing key"):
        again.load_state_dict(checkpoint)
    fresh = model()
    fresh["lstmp"].requires_grad_(False)  # frozen: stays frozen
    fresh["keep"].eval()
    assert ak.swap_like(fresh, checkpoint) is fresh
    assert {k: type(v) for k, v in fresh.items()} == {k: type(v) for k, v in swapped.items()}
    assert type(fresh["keep"]) is nn.Linear and not fresh["keep"].training
    assert not any(p.requires_grad for p in fresh["lstmp"].parameters())
    assert all(p.requires_grad for p in fresh["enc"].parameters())
    fresh.load_state_dict(checkpoint)
    assert fresh["sparse"].block_size == 16 and fresh["sparse"].proj_size == 16
    x = torch.randn(5, 3, 32)
    with torch.no_grad():
        for name in ("enc", "lstmp", "sparse"):
            torch.testing.assert_close(fresh[name](x)[0], swapped[name](x)[0], rtol=0, atol=0)
        torch.testing.assert_close(fresh["cell"](x[0])[0], swapped["cell"](x[0])[0], rtol=0, atol=0)
        torch.testing.assert_close(fresh["out"](x[0, :, :1].expand(3, 64)), swapped["out"](x[0, :, :1].expand(3, 64)))
    hooked = model()
    hooked["out"].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="swap_like: the checkpoint holds out as BlockSparseLinear, but it has "
                                         "forward hook"):
        ak.swap_like(hooked, checkpoint)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        ak.swap_like(model(), [1, 2])
