"""amnets.decode: the RNN-T beam search beside greedy decoding (AmNetsRNNT.beam_decode, eval --beam)."""

import numpy as np
import pytest
import torch

from amnets.decode import beam_search, sequence_log_prob
from amnets.model import AmNetsRNNT


def make_model(seed: int, cheap: str = "sparse") -> AmNetsRNNT:
    torch.manual_seed(seed)
    model = AmNetsRNNT(80, 29, 32, 1, cheap=cheap, block_size=16, rank=4, pred_hidden=16, joint_hidden=16,
                       arbitrator_hidden=8).eval()
    with torch.no_grad():  # a peakier, blank-heavier joint, as after some training: real choices to make
        model.out.weight.mul_(4)
        model.out.bias[0] += 0.5
    return model


def utterances(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 40, 80, generator=gen), torch.tensor([40, 31, 20])


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
@pytest.mark.parametrize("max_symbols", [1, 3])
def test_beam_of_one_is_greedy_decoding(cheap, max_symbols):
    for seed in range(3):
        model, (feats, lens) = make_model(seed, cheap), utterances(seed)
        greedy = model.greedy_decode(feats, lens, max_symbols)
        assert any(greedy)  # not all empty: the comparison has labels to compare
        assert model.beam_decode(feats, lens, 1, max_symbols) == greedy


def test_a_wider_beam_never_scores_below_greedy():
    """The search's own score (log-probability of the alignments it kept): beam 4's best is never below
    greedy's path. Each score is also bounded by the exact log P(labels | audio) over every alignment.
    (Under the exact measure a beam can in principle lose to greedy: it sees only the alignments it kept.)"""
    wider = 0
    for seed in range(4):
        model, (feats, lens) = make_model(seed), utterances(seed)
        enc_p, _, enc_lens = model._encode(feats, lens)
        greedy_labels = model.greedy_decode(feats, lens)
        for b in range(3):
            enc = enc_p[b, :int(enc_lens[b])]
            (greedy, greedy_score), = beam_search(model, enc, beam=1)
            nbest = beam_search(model, enc, beam=4)
            assert greedy == greedy_labels[b]
            assert len(nbest) <= 4 and len({tuple(h) for h, _ in nbest}) == len(nbest)
            assert [s for _, s in nbest] == sorted((s for _, s in nbest), reverse=True)
            assert nbest[0][1] >= greedy_score - 1e-5
            wider += nbest[0][1] > greedy_score + 1e-3
            for labels, score in ((greedy, greedy_score), nbest[0]):
                assert score <= sequence_log_prob(model, enc, labels) + 1e-4
    assert wider >= 3  # the wider beam does find better hypotheses, not only the same ones


def test_sequence_log_prob_is_the_rnnt_loss():
    model, (feats, lens) = make_model(0), utterances(0)
    labels = [3, 5, 2, 9]
    enc_p, _, enc_lens = model._encode(feats[:1], lens[:1])
    loss, _ = model.loss(feats[:1], lens[:1], torch.tensor([labels]), torch.tensor([4]))
    got = sequence_log_prob(model, enc_p[0, :int(enc_lens[0])], labels)
    assert got == pytest.approx(-loss.item(), rel=1e-4)


def test_beam_decode_checks_its_arguments():
    model, (feats, lens) = make_model(0), utterances(0)
    with pytest.raises(ValueError, match="beam must be an int >= 1"):
        model.beam_decode(feats, lens, beam=0)
    with pytest.raises(ValueError, match="AmNetsRNNT.beam_decode: max_symbols_per_frame"):
        model.beam_decode(feats, lens, beam=2, max_symbols_per_frame=0)
    with pytest.raises(ValueError, match="beam must be an int >= 1; got True"):
        model.beam_decode(feats, lens, beam=True)
    hyps, decisions, enc_lens = model.beam_decode(feats, lens, beam=2, return_decisions=True)
    assert len(hyps) == 3 and enc_lens.tolist() == [14, 11, 7] and not decisions[2, 7:].any()
    # numpy integers (a config array's) are counts too, and decode the same
    assert model.beam_decode(feats, lens, beam=np.int64(2), max_symbols_per_frame=np.int32(5)) == hyps
    assert model.greedy_decode(feats, lens, max_symbols_per_frame=np.int64(5)) == model.greedy_decode(feats, lens)


def test_beam_search_and_sequence_log_prob_check_enc_p_and_labels():
    """A wrong enc_p or label gave a silent answer (a 1-D enc_p decoded as T frames, the blank scored as a
    label) or a raw error deep in torch; each is now a ValueError naming the argument."""
    model = make_model(0)
    enc = torch.randn(5, 16)
    for bad in (enc[0], enc[None], torch.randn(5, 7)):
        with pytest.raises(ValueError, match="enc_p must be a"):
            beam_search(model, bad, 2, 2)
        with pytest.raises(ValueError, match="enc_p must be a"):
            sequence_log_prob(model, bad, [3])
    with pytest.raises(ValueError, match="enc_p is torch.float64"):
        beam_search(model, enc.double(), 2, 2)
    with pytest.raises(ValueError, match="enc_p holds NaN or inf"):
        beam_search(model, torch.cat([enc, torch.full((1, 16), float("nan"))]), 2, 2)
    for labels in ([0, 3], [29], [-1], [1.0], [True], "ab"):
        with pytest.raises(ValueError, match=r"labels must be a list of ints in \[1, vocab_size-1=28\]"):
            sequence_log_prob(model, enc, labels)
    assert sequence_log_prob(model, enc, torch.tensor([3, 4])) == sequence_log_prob(model, enc, [3, 4])
    assert beam_search(model, enc[:0], 2, 2) == [([], 0.0)]  # T = 0: the empty hypothesis


def test_decoding_refuses_non_finite_features_within_the_lengths():
    model, (feats, lens) = make_model(0), utterances(0)
    feats[1, lens[1]:] = float("nan")  # past utterance 1's length: never read
    assert model.greedy_decode(feats, lens) == model.greedy_decode(torch.nan_to_num(feats), lens)
    feats[1, 3, 5] = float("inf")
    for decode in (model.greedy_decode, model.beam_decode):
        with pytest.raises(ValueError, match=r"feats hold NaN or inf within the lengths of utterance\(s\) \[1\]"):
            decode(feats, lens)
