"""swap_in: replacing nn.LSTM / nn.Linear / torchaudio RNNTLoss inside an existing model."""

import copy
import warnings

import pytest
import torch
import torchaudio
from torch import nn

import amnets_kernels as ak
from amnets_kernels.nn import (BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell, NotCheaperWarning,
                              RNNTLoss)


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
                                 loss=False, return_report=True)
    assert isinstance(swapped.encoder, LowRankLSTM) and type(swapped.predictor) is nn.LSTM
    assert type(swapped.joint) is nn.Linear
    (entry,) = report.replaced
    assert entry["macs_before"] == 4 * 16 * (12 + 16) + 4 * 16 * (16 + 16)
    assert entry["macs_after"] == swapped.encoder.macs_per_frame() < entry["macs_before"]
    assert report.params_after < report.params_before
    again = ak.swap_in(TinyTransducer(), linear_sparsity=0.5, block_size=4, exclude=["joint"])
    assert type(again.joint) is nn.Linear


def test_swapped_model_trains_and_round_trips():
    model = ak.swap_in(TinyTransducer(), lstm_rank=4, linear_sparsity=0.5, block_size=4)
    feats, labels = inputs()
    with ak.use_backend("reference"):
        logits = model(feats, labels)
        loss = model.loss(logits, labels.int(), torch.tensor([7, 7], dtype=torch.int32),
                          torch.tensor([3, 3], dtype=torch.int32))
        loss.backward()
    assert isinstance(model.joint, BlockSparseLinear) and model.joint.values.grad is not None
    assert model.encoder.w_hh_u_l0.grad is not None
    fresh = ak.swap_in(TinyTransducer(), lstm_rank=4, linear_sparsity=0.5, block_size=4)
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
    assert isinstance(sparse["bi"], BlockSparseLSTM) and type(sparse["proj"]) is nn.LSTM
    assert {s["name"] for s in report.skipped} == {"proj", "cell", "gru"}
    x = torch.randn(5, 2, 32)
    with torch.no_grad():
        bi = sparse["bi"].eval()  # no dropout
        torch.testing.assert_close(bi(x)[0], bi.to_dense()(x)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lstm_rank .* or lstm_sparsity .*not both"):
        ak.swap_in(model, lstm_rank=8, lstm_sparsity=0.5)


def test_unswap_gives_plain_modules_and_dense_state_dicts():
    model = TinyTransducer()
    feats, labels = inputs()
    swapped = ak.swap_in(copy.deepcopy(model), lstm_rank=4, linear_sparsity=0.5, block_size=4)
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
