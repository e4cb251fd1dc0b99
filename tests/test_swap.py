"""swap_in: replacing nn.LSTM / nn.Linear / torchaudio RNNTLoss inside an existing model."""

import torch
import torchaudio
from torch import nn

import amnets_kernels as ak
from amnets_kernels.nn import BlockSparseLinear, LowRankLSTM, RNNTLoss


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
    swapped, report = ak.swap_in(model, lstm_rank=10**6, linear_sparsity=0.0, block_size=4, return_report=True)
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
    lstm = nn.LSTM(4, 4)
    swapped = ak.swap_in(lstm, lstm_rank=2)
    assert isinstance(swapped, LowRankLSTM)
