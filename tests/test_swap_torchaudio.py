"""swap_in on models nobody here wrote: torchaudio's Tacotron2, Emformer RNN-T, Conformer, DeepSpeech and
WaveRNN (small configurations of each). At the README's settings nothing gets larger or degenerate and
what has no counterpart is reported, not raised; at full rank / sparsity 0 the outputs do not move."""

import copy
import warnings

import pytest
import torch
import torchaudio.models as M

import amnets_kernels as ak
from amnets_kernels.nn import BlockSparseLinear, LowRankLSTM, LowRankLSTMCell, NotCheaperWarning

README = dict(lstm_rank=64, linear_sparsity=0.75, block_size=32)  # the drop-in section's example


def tacotron2():
    model = M.Tacotron2(n_symbol=40, n_mels=40, symbol_embedding_dim=128, encoder_embedding_dim=128, encoder_n_convolution=1,
                        decoder_rnn_dim=256, attention_rnn_dim=256, attention_hidden_dim=64, prenet_dim=64,
                        postnet_n_convolution=1, postnet_embedding_dim=64, decoder_max_step=20)
    tokens, lengths = torch.randint(1, 40, (2, 9)), torch.tensor([9, 6])
    mels, mel_lengths = torch.randn(2, 40, 12), torch.tensor([12, 10])
    return model, lambda m: m(tokens, lengths, mels, mel_lengths)[:2]


def emformer_rnnt():
    model = M.emformer_rnnt_model(
        input_dim=40, encoding_dim=64, num_symbols=32, segment_length=4, right_context_length=2,
        time_reduction_input_dim=64, time_reduction_stride=2, transformer_num_heads=4, transformer_ffn_dim=128,
        transformer_num_layers=2, transformer_dropout=0.0, transformer_activation="gelu",
        transformer_left_context_length=8, transformer_max_memory_size=0, transformer_weight_init_scale_strategy=None,
        transformer_tanh_on_mem=False, symbol_embedding_dim=32, num_lstm_layers=1, lstm_layer_norm=True,
        lstm_layer_norm_epsilon=1e-5, lstm_dropout=0.0)
    sources, source_lengths = torch.randn(2, 18, 40), torch.tensor([18, 14])
    targets, target_lengths = torch.randint(1, 32, (2, 4)), torch.tensor([4, 3])
    return model, lambda m: m(sources, source_lengths, targets, target_lengths)[0]


def conformer():
    model = M.Conformer(input_dim=64, num_heads=4, ffn_dim=128, num_layers=2, depthwise_conv_kernel_size=7)
    feats, lengths = torch.randn(2, 15, 64), torch.tensor([15, 11])
    return model, lambda m: m(feats, lengths)[0]


def deepspeech():
    model = M.DeepSpeech(n_feature=40, n_hidden=96, n_class=30)
    feats = torch.randn(2, 1, 20, 40)
    return model, lambda m: m(feats)


def wavernn():
    model = M.WaveRNN(upsample_scales=[2, 2], n_classes=64, hop_length=4, n_res_block=2, n_rnn=64, n_fc=64,
                      n_freq=20, n_hidden=32, n_output=32)
    waveform, specgram = torch.randn(2, 1, 4 * (10 - 4)), torch.randn(2, 1, 20, 10)
    return model, lambda m: m(waveform, specgram)


MODELS = dict(tacotron2=tacotron2, emformer_rnnt=emformer_rnnt, conformer=conformer, deepspeech=deepspeech,
              wavernn=wavernn)
UNSUPPORTED = dict(deepspeech={"bi_rnn": "RNN"}, wavernn={"rnn1": "GRU", "rnn2": "GRU"})


def outputs(run, model):
    torch.manual_seed(0)  # Tacotron2's prenet drops out even in eval mode
    with ak.use_backend("reference"), torch.no_grad():
        out = run(model.eval())
    return [out] if torch.is_tensor(out) else list(out)


@pytest.mark.parametrize("name", MODELS)
def test_readme_settings_never_enlarge_or_degenerate(name):
    model, run = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCheaperWarning)  # nothing degenerate built, not even silently
        swapped, report = ak.swap_in(model, **README, return_report=True)
    assert report.replaced, str(report)
    for entry in report.replaced:
        assert entry["params_after"] <= entry["params_before"], entry
        assert entry["macs_after"] < entry["macs_before"] or entry["macs_before"] == 0, entry
    unsupported = {s["name"]: s["from"] for s in report.skipped if "no amnets counterpart" in s["reason"]}
    assert unsupported == UNSUPPORTED.get(name, {})
    for entry in report.skipped:
        assert entry["reason"], entry  # every layer left alone says why
    assert all(torch.isfinite(o).all() for o in outputs(run, swapped))


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_and_sparsity_zero_do_not_move_the_outputs(name):
    model, run = MODELS[name]()
    before = outputs(run, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCheaperWarning)  # asked for: full rank / sparsity 0 never pay
        swapped, report = ak.swap_in(copy.deepcopy(model), lstm_rank=10**6, linear_sparsity=0.0, block_size=16,
                                     only_if_cheaper=False, return_report=True)
    assert report.replaced
    for got, want in zip(outputs(run, swapped), before):
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-5)
    dense = ak.unswap(swapped)  # and back to plain modules: same outputs, the original's state_dict keys
    assert not any(isinstance(m, (BlockSparseLinear, LowRankLSTM, LowRankLSTMCell)) for m in dense.modules())
    for got, want in zip(outputs(run, dense), before):
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-5)
    model.load_state_dict(dense.state_dict())


def test_tacotron2_recurrent_layers_are_all_swapped():
    model, _ = tacotron2()
    _, report = ak.swap_in(model, lstm_rank=32, return_report=True)
    kinds = {r["name"]: r["to"] for r in report.replaced}
    assert kinds == {"encoder.lstm": "LowRankLSTM", "decoder.attention_rnn": "LowRankLSTMCell",
                     "decoder.decoder_rnn": "LowRankLSTMCell"}, str(report)
    assert model.encoder.lstm.bidirectional
