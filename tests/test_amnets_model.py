"""The AmNets model package `amnets`: latency simulator, switching encoder, RNN-T model."""

import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from amnets.latency import simulate_latency


# ---------------------------------------------------------------------------------------------------
# latency


def test_latency_real_time_worker_never_falls_behind():
    r = simulate_latency([0.004] * 10, 0.01)
    assert r["upl"] == pytest.approx(0.004)
    assert r["rtf"] == pytest.approx(0.4)
    assert r["max_backlog"] == pytest.approx(0.0)


def test_latency_hand_computed_backlog():
    # arrivals 1, 2, 3; frame 0 runs 1..4, frame 1 waits 2 (4..5), frame 2 waits 2 (5..5.5)
    r = simulate_latency(torch.tensor([3.0, 1.0, 0.5]), 1.0, final_cost=0.25)
    assert r["max_backlog"] == pytest.approx(2.0)
    assert r["upl"] == pytest.approx(5.5 + 0.25 - 3.0)
    assert r["rtf"] == pytest.approx(4.75 / 3.0)


@pytest.mark.parametrize("costs, period, final, match", [
    ([0.1, -0.1], 1.0, 0.0, "frame_costs"), ([], 1.0, 0.0, "frame_costs"), ([0.1], 0.0, 0.0, "frame_period"),
    ([0.1], -1.0, 0.0, "frame_period"), ([0.1], 1.0, -1.0, "final_cost"), (["x"], 1.0, 0.0, "frame_costs"),
    ("123", 1.0, 0.0, "frame_costs"),  # a string iterates as characters: not costs [1, 2, 3]
    ([1.0], 5e-324, 0.0, "inputs overflow a float"), ([1e308, 1e308], 1.0, 0.0, "inputs overflow a float")])  # inf
def test_latency_rejects_bad_input(costs, period, final, match):
    with pytest.raises(ValueError, match=match):
        simulate_latency(costs, period, final_cost=final)


@pytest.mark.parametrize("costs", [torch.full((2, 3), 0.1), np.full((2, 3), 0.1), np.full((3, 1), 0.1),
                                   torch.tensor(0.1)])
def test_latency_takes_one_stream_as_a_tensor_or_an_array_alike(costs):
    # A (B, T) tensor was flattened into one stream of B * T frames while the same ndarray was refused.
    with pytest.raises(ValueError, match=r"frame_costs must be 1-d \(one stream's costs; call once per "
                                         rf"stream\); got shape {re.escape(str(tuple(costs.shape)))}"):
        simulate_latency(costs, 1.0)
    want = simulate_latency([0.1, 0.2], 1.0)
    assert simulate_latency(torch.tensor([0.1, 0.2], dtype=torch.float64), 1.0) == want
    assert simulate_latency(np.array([0.1, 0.2]), 1.0) == want


def test_latency_takes_real_numbers_of_any_kind_but_not_bools():
    # np.float32 was refused where np.float64 (a float subclass) passed; bools passed as 1.0 and 0.0.
    r = simulate_latency([np.float32(0.5)], np.float32(0.25), final_cost=np.float32(0.125))
    assert r == simulate_latency([0.5], 0.25, final_cost=0.125) and type(r["upl"]) is float
    for costs, period, final, name in (([True, False], 1.0, 0.0, "frame_costs"),
                                       (torch.tensor([True]), 1.0, 0.0, "frame_costs"),
                                       (["0.5"], 1.0, 0.0, "frame_costs"), ([0.5], True, 0.0, "frame_period"),
                                       ([0.5], np.bool_(True), 0.0, "frame_period"),
                                       ([0.5], 1.0, True, "final_cost")):
        with pytest.raises(ValueError, match=name):
            simulate_latency(costs, period, final_cost=final)


# ---------------------------------------------------------------------------------------------------
# encoder

from torch import nn  # noqa: E402

from amnets.encoder import AmNetsEncoder  # noqa: E402
from amnets_kernels.nn import NotCheaperWarning  # noqa: E402

D, H, L = 16, 32, 2


def make_encoder(cheap="sparse", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"sparsity": 0.5, "block_size": 16, "rank": 4, "arbitrator_hidden": 8, **kw}
    return AmNetsEncoder(kw.pop("input_size", D), H, kw.pop("num_layers", L), cheap=cheap, **kw).eval()


def lstm_stack(enc, weight):
    """nn.LSTM (batch_first) whose layer k has [W_ih | W_hh] = weight(k) and enc's bias."""
    lstm = nn.LSTM(enc.input_size, enc.hidden_size, enc.num_layers, batch_first=True)
    with torch.no_grad():
        for k in range(enc.num_layers):
            w = weight(k)
            d = enc.layer_input_size(k)
            getattr(lstm, f"weight_ih_l{k}").copy_(w[:, :d])
            getattr(lstm, f"weight_hh_l{k}").copy_(w[:, d:])
            getattr(lstm, f"bias_ih_l{k}").copy_(getattr(enc, f"bias_l{k}"))
            getattr(lstm, f"bias_hh_l{k}").zero_()
    return lstm


def spread_arbitrator(enc, scale=3.0):
    """Make the arbitrator's p_full spread over (0, 1) so that both branches get used, and make the
    previous h (when it is an input) sway it as much as the frame does (h is small next to x)."""
    with torch.no_grad():
        for p in enc.arbitrator.parameters():
            p.mul_(scale)
        enc.arbitrator[0].weight[:, enc.input_size:].mul_(10.0)
    return enc


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_forced_full_stream_is_an_lstm_with_the_full_weights(cheap):
    enc = make_encoder(cheap)
    x = torch.randn(3, 7, D)
    out, (h, c), dec = enc.stream(x, force="full")
    ref, (h_ref, c_ref) = lstm_stack(enc, enc.full_weight)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    assert dec.dtype == torch.bool and dec.all()


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_forced_cheap_stream_is_an_lstm_with_the_cheap_weights(cheap):
    enc = make_encoder(cheap)
    x = torch.randn(3, 7, D)
    out, _, dec = enc.stream(x, force="cheap")
    for k in range(L):
        w, d = enc.full_weight(k), enc.layer_input_size(k)
        if cheap == "sparse":  # the dense oracle: the same weights, masked by hand from the block mask
            keep = getattr(enc, f"block_mask_l{k}")
            assert keep.float().mean().item() == pytest.approx(0.5)
            mask = torch.zeros_like(w)
            for r, col in keep.nonzero().tolist():
                mask[16 * r:16 * (r + 1), 16 * col:16 * (col + 1)] = 1
            torch.testing.assert_close(enc.cheap_weight(k), w * mask, atol=0, rtol=0)
        else:
            u_ih, v_ih, u_hh, v_hh = enc.lowrank_weights(k)
            assert u_ih.shape == (4 * H, 4) and v_ih.shape == (4, d) and v_hh.shape == (4, H)
            torch.testing.assert_close(enc.cheap_weight(k), torch.cat([u_ih @ v_ih, u_hh @ v_hh], 1))
    ref, _ = lstm_stack(enc, enc.cheap_weight)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full, _ = lstm_stack(enc, enc.full_weight)(x)
    assert (out - full).abs().max() > 1e-3 and not dec.any()  # the cheap branch really differs


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_mixed_batch_equals_each_stream_alone(cheap):
    enc = spread_arbitrator(make_encoder(cheap, arbitrator_uses_state=True, per_layer_decisions=True))
    x = torch.randn(4, 9, D)
    force = torch.tensor([True, False, False, True])
    for f in (force, None):
        out, (h, c), dec = enc.stream(x, force=f)
        for b in range(4):
            fb = None if f is None else ("full" if f[b] else "cheap")
            out_b, (h_b, c_b), dec_b = enc.stream(x[b:b + 1], force=fb)
            torch.testing.assert_close(out[b:b + 1], out_b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[:, b:b + 1], h_b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c[:, b:b + 1], c_b, atol=1e-5, rtol=1e-5)
            assert torch.equal(dec[b:b + 1], dec_b)
    assert dec.shape == (4, 9, L) and 0 < dec.sum() < dec.numel()  # the arbitrator mixed the branches


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_chunked_streaming_equals_one_shot(cheap):
    enc = spread_arbitrator(make_encoder(cheap, arbitrator_uses_state=True))
    x = torch.randn(2, 12, D)
    out, (h, c), dec = enc.stream(x)
    assert 0 < dec.sum() < dec.numel()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        cuts = sorted(torch.randint(0, 13, (3,), generator=gen).tolist())
        state, outs, decs = None, [], []
        for lo, hi in zip([0] + cuts, cuts + [12]):  # includes empty chunks
            o, state, d = enc.stream(x[:, lo:hi], state)
            outs.append(o)
            decs.append(d)
        torch.testing.assert_close(torch.cat(outs, 1), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[0], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[1], c, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.cat(decs, 1), dec)


@pytest.mark.parametrize("cheap, per_layer", [("sparse", False), ("lowrank", False), ("sparse", True)])
def test_eval_stream_matches_eval_forward(cheap, per_layer):
    enc = spread_arbitrator(make_encoder(cheap, arbitrator_uses_state=True, per_layer_decisions=per_layer))
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        out_f, aux = enc(x, torch.tensor([10, 10, 10]))
    out_s, _, dec = enc.stream(x)
    assert torch.equal(aux["decisions"], dec) and 0 < dec.sum() < dec.numel()
    torch.testing.assert_close(out_s, out_f, atol=1e-5, rtol=1e-5)


def test_cost_model_hand_count():
    # layer 0: [W_ih | W_hh] is 128 x 48 (8 x 3 blocks of 16); layer 1: 128 x 64 (8 x 4 blocks)
    arb = 16 * 8 + 8 * 1
    sparse = make_encoder("sparse")
    assert sparse.macs_per_frame("full") == arb + 128 * 48 + 128 * 64
    assert sparse.macs_per_frame("cheap") == arb + 12 * 256 + 16 * 256  # half the blocks kept
    lowrank = make_encoder("lowrank")  # rank 4: r (in + out) per factor pair
    assert lowrank.macs_per_frame("cheap") == arb + 4 * (16 + 128) + 4 * (32 + 128) + 2 * 4 * (32 + 128)
    per_layer = make_encoder("sparse", per_layer_decisions=True, arbitrator_uses_state=True)
    assert per_layer.arbitrator_macs() == (16 + 32) * 8 + 8 * 2
    # edge blocks are clipped: the count equals the nonzeros of the masked weights
    ragged = make_encoder("sparse", input_size=20, block_size=16)
    assert ragged.macs_per_frame("cheap") - ragged.arbitrator_macs() == sum(
        int(torch.count_nonzero(ragged.cheap_weight(k))) for k in range(L))


@pytest.mark.parametrize("per_layer", [False, True])
def test_forward_aux_statistics(per_layer):
    enc = spread_arbitrator(make_encoder("sparse", per_layer_decisions=per_layer)).train()
    x, lengths = torch.randn(3, 6, D), torch.tensor([6, 2, 0])
    out, aux = enc(x, lengths)
    extra = (L,) if per_layer else ()
    assert out.shape == (3, 6, H) and aux["p_full"].shape == (3, 6, *extra)
    assert aux["decisions"].shape == (3, 6, *extra) and aux["decisions"].dtype == torch.bool
    assert aux["expected_macs"].shape == (3, 6) and aux["cost_fraction"].dim() == 0
    pad = ~aux["mask"]
    assert pad.sum() == 10 and (out[pad] == 0).all() and (aux["expected_macs"][pad] == 0).all()
    assert not aux["decisions"][pad].any() and (aux["p_full"][pad] == 0).all()
    full = [enc.layer_macs(k, "full") for k in range(L)]
    cheap = [enc.layer_macs(k, "cheap") for k in range(L)]
    p = aux["p_full"].double().reshape(3, 6, -1).expand(3, 6, L)
    hand = enc.arbitrator_macs() + sum(p[..., k] * full[k] + (1 - p[..., k]) * cheap[k] for k in range(L))
    hand = hand * aux["mask"]
    torch.testing.assert_close(aux["expected_macs"].double(), hand, rtol=1e-6, atol=1e-3)
    frac = hand.sum() / (8 * enc.macs_per_frame("full"))
    assert aux["cost_fraction"].item() == pytest.approx(frac.item(), rel=1e-5)
    # A forced encoder runs no arbitrator and counts none: forced full is the dense LSTM, exactly 1.
    enc.force = "full"
    assert enc(x, lengths)[1]["cost_fraction"].item() == pytest.approx(1.0, rel=1e-6)
    enc.force = "cheap"
    cheap_only = sum(cheap) / sum(full)
    assert enc(x, lengths)[1]["cost_fraction"].item() == pytest.approx(cheap_only, rel=1e-6)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_training_gradients_reach_arbitrator_weights_and_factors(cheap):
    enc = make_encoder(cheap).train()
    enc.tau = 0.5
    x = torch.randn(2, 5, D)
    out, aux = enc(x, torch.tensor([5, 4]))
    assert aux["decisions"].any() or (~aux["decisions"][aux["mask"]]).any()
    out.pow(2).sum().backward()  # no cost term: the arbitrator learns only through the straight-through path
    for name in ["arbitrator.0.weight", "weight_ih_l0", "weight_hh_l1", "bias_l0"] + (
            ["w_ih_u_l0", "w_hh_v_l1"] if cheap == "lowrank" else []):
        grad = dict(enc.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    enc.zero_grad()
    enc(x)[1]["cost_fraction"].backward()  # the cost term alone pushes p_full
    assert enc.arbitrator[2].bias.grad.abs().sum() > 0


def test_training_decisions_are_random_eval_decisions_are_not():
    enc = make_encoder("sparse")
    x = torch.randn(4, 12, D)
    with torch.no_grad():
        assert torch.equal(enc(x)[1]["decisions"], enc(x)[1]["decisions"])
        enc.train()
        assert not torch.equal(enc(x)[1]["decisions"], enc(x)[1]["decisions"])


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_stream_steps_follow_the_weights(cheap):
    enc = make_encoder(cheap)
    steps = enc._stream_steps()
    assert enc._stream_steps()[0] is steps[0]  # unchanged weights: reused
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    x = torch.randn(2, 4, D)
    enc.train()
    enc(x)[0].sum().backward()
    opt.step()
    enc.eval()
    assert enc._stream_steps()[0] is not steps[0]
    out, _, _ = enc.stream(x, force="full")
    torch.testing.assert_close(out, lstm_stack(enc, enc.full_weight)(x)[0], atol=1e-5, rtol=1e-5)
    out, _, _ = enc.stream(x, force="cheap")
    torch.testing.assert_close(out, lstm_stack(enc, enc.cheap_weight)(x)[0], atol=1e-5, rtol=1e-5)


def test_reprune_recomputes_the_mask_from_current_weights():
    enc = make_encoder("sparse")
    keep = enc.block_mask_l0.clone()
    with torch.no_grad():  # make a dropped block the largest
        r, col = (~keep).nonzero()[0].tolist()
        enc.weight_ih_l0[16 * r:16 * (r + 1), 16 * col:16 * (col + 1)] = 10.0
    enc.reprune()
    assert enc.block_mask_l0[r, col] and enc.block_mask_l0.sum() == keep.sum()
    with pytest.raises(ValueError, match="only the sparse"):
        make_encoder("lowrank").reprune()


@pytest.mark.parametrize("kwargs, match", [
    (dict(cheap="pruned"), "cheap must be one of"), (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"), (dict(cheap="lowrank", rank=0), "rank"),
    (dict(block_size=0), "block_size"),
    (dict(tau=0.0), "tau"), (dict(init_p_full=1.0), r"init_p_full must be in \(0, 1\)"),
    (dict(per_layer_decisions="no"), "per_layer_decisions must be a bool"),  # a truthy string
    (dict(arbitrator_uses_state=1), "arbitrator_uses_state must be a bool"),
    (dict(threshold=1.5), r"threshold must be in \[0, 1\]")])
def test_encoder_rejects_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_encoder(**kwargs)


@pytest.mark.parametrize("sparsity, block_size, grid", [(0.999, 16, "8 x 17"), (0.8, 1000, "1 x 1")])
def test_a_sparse_branch_that_keeps_no_block_is_never_silent(sparsity, block_size, grid):
    # Was accepted silently: a cheap branch of the bias alone, trained and streamed. Legal (the engines run
    # it; amnets train refuses it), so a NotCheaperWarning, as amnets_kernels' own modules give.
    with pytest.warns(NotCheaperWarning, match=rf"^AmNetsEncoder: sparsity={sparsity:g} with "
                                               rf"block_size={block_size}: the pruning keeps no block of "
                                               rf"\[W_ih \| W_hh\] in layer 0 \({grid} blocks\), so the "
                                               "sparse branch there would be the bias alone; lower sparsity "
                                               "or block_size$"):
        AmNetsEncoder(240, 32, 1, sparsity=sparsity, block_size=block_size)
    enc = make_encoder("sparse")  # two layers
    enc.sparsity = 0.999
    with pytest.warns(NotCheaperWarning, match=r"in layer 0 \(8 x 3 blocks\), layer 1 \(8 x 4 blocks\), so"):
        enc.reprune()


def test_a_cheap_branch_no_cheaper_than_the_full_one_is_never_silent():
    # Was silent: a rank clipped to a small layer's sides (layer 1 here: input 32 = H) gave a "cheap" branch
    # of more MACs than the full one; so did a pruning that keeps every block. `amnets train` refuses both.
    with pytest.warns(NotCheaperWarning, match=r"^AmNetsEncoder: cheap='lowrank', rank=32: the cheap branch "
                                               r"costs no fewer MACs per frame than the full one in layer 1 "
                                               r"\(10,240 >= 8,192\), so choosing it saves nothing there; "
                                               "lower the rank$"):
        AmNetsEncoder(80, 32, 2, cheap="lowrank", rank=32)
    with pytest.warns(NotCheaperWarning, match=r"rank=1000 \(clipped to 80 by the layers' sizes\): "):
        AmNetsEncoder(80, 32, 1, cheap="lowrank", rank=1000)  # it quoted the clipped rank alone, as if given
    with pytest.warns(NotCheaperWarning, match=r"sparsity=0 with block_size=16: .* in layer 0 \(14,336 >= "
                                               r"14,336\), layer 1 \(8,192 >= 8,192\), so .*; raise sparsity$"):
        AmNetsEncoder(80, 32, 2, sparsity=0.0, block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCheaperWarning)
        AmNetsEncoder(80, 32, 2, cheap="lowrank", rank=8)  # cheaper in both layers: silent
        AmNetsEncoder(80, 32, 2, sparsity=0.5, block_size=16)


@pytest.mark.parametrize("threshold", [0, 1.0])
def test_encoder_thresholds_at_the_extremes(threshold):
    """threshold 0 (every frame full) and 1 (none) are accepted by the constructor as by stream()."""
    enc = make_encoder("sparse", threshold=threshold).eval()
    x = torch.randn(2, 4, D)
    decisions = enc(x)[1]["decisions"]
    assert bool(decisions.all()) == (threshold == 0) and bool((~decisions).all()) == (threshold == 1)
    assert torch.equal(enc.stream(x)[2], decisions)


def test_encoder_rejects_bad_calls():
    enc = make_encoder("sparse")
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="feature dim 15"):
        enc(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="feature dim 15"):
        enc.stream(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        enc(x, torch.tensor([6, 5]))
    with pytest.raises(ValueError, match=r"lengths must lie"):
        enc(x, torch.tensor([-1, 5]))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        enc(x, torch.tensor([5]))
    with pytest.raises(ValueError, match="force must be"):
        enc.stream(x, force="sometimes")
    with pytest.raises(ValueError, match=r"force must be.*; got a torch.int64 tensor of shape \(2,\)"):
        enc.stream(x, force=torch.tensor([1, 0]))  # the dtype is what is wrong: the message shows it
    for bad in (torch.tensor(0.5), "0.5", True):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\] \(a number\); got .* \(a "):
            enc.stream(x, threshold=bad)
    for fine in (np.float32(0.25), 0, 1):  # any real number in range, numpy's too; 0 and 1 are the extremes
        assert enc.eval().stream(x, threshold=fine)[0].shape == (2, 5, H)
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but the encoder's weights are torch.float32"):
        enc(x.double())  # as stream() says it
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but the encoder's weights are torch.float32"):
        enc.stream(x.double())
    enc.force = "bogus"  # an attribute set after construction is checked where it is used
    with pytest.raises(ValueError, match="force must be one of"):
        enc(x)
    enc.force, enc.threshold = None, 1.5
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        enc(x)
    enc.threshold = 0.5
    with pytest.raises(ValueError, match="state must be"):
        enc.stream(x, state=(torch.zeros(L, 3, H), torch.zeros(L, 3, H)))
    with pytest.raises(ValueError, match="branch must be"):
        enc.macs_per_frame("dense")
    enc.tau = 0
    with pytest.raises(ValueError, match="tau must be a finite real number > 0"):
        enc.train()(x)


# ---------------------------------------------------------------------------------------------------
# RNN-T model

import amnets_kernels as ak  # noqa: E402

from amnets.model import AmNetsRNNT, stack_frames  # noqa: E402

F_IN, V = 8, 6


def make_model(cheap="sparse", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"sparsity": 0.5, "block_size": 16, "rank": 4, "arbitrator_hidden": 8, **kw}
    return AmNetsRNNT(F_IN, V, 32, kw.pop("num_layers", 1), cheap=cheap, **kw)


def toy_batch():
    torch.manual_seed(123)
    feats = torch.randn(2, 24, F_IN)
    return feats, torch.tensor([24, 19]), torch.tensor([[1, 3, 2], [4, 5, 0]]), torch.tensor([3, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(stack=0), "stack must be an int >= 1"), (dict(tail="bogus"), "tail must be one of"),
    (dict(lengths=torch.tensor([True, False])), "lengths must be an integer tensor")])
def test_stack_frames_rejects_bad_input(kwargs, match):
    args = dict(feats=torch.randn(2, 7, 3), lengths=torch.tensor([7, 4]), stack=3, tail="pad") | kwargs
    with pytest.raises(ValueError, match=match):
        stack_frames(**args)


def test_training_under_autocast_takes_low_precision_inputs():
    """Under torch.autocast the dtype check lets bf16 features through (the products cast as autocast says),
    as before the check existed; outside it they are refused with a named error (tested above)."""
    model = make_model()
    feats, feat_lens, targets, target_lens = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(feats.bfloat16(), feat_lens, targets, target_lens)
        out, _ = model.encoder(torch.randn(2, 5, model.encoder.input_size, dtype=torch.bfloat16))
    assert torch.isfinite(loss) and out.dtype == torch.bfloat16


def test_model_dtype_and_device_apply_to_every_part():
    model = AmNetsRNNT(F_IN, V, 16, 1, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    feats, feat_lens, targets, target_lens = toy_batch()
    loss, _ = model.loss(feats.double(), feat_lens, targets, target_lens)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_stack_frames_by_hand():
    feats = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 7, 2)
    x, lens = stack_frames(feats, torch.tensor([7, 4]), 3, "pad")
    assert x.shape == (2, 3, 6) and lens.tolist() == [3, 2]
    assert torch.equal(x[0, 1], feats[0, 3:6].reshape(-1))
    assert torch.equal(x[0, 2], torch.cat([feats[0, 6], torch.zeros(4)]))
    x, lens = stack_frames(feats, torch.tensor([7, 4]), 3, "drop")
    assert x.shape == (2, 2, 6) and lens.tolist() == [2, 1]


def test_stack_frames_reads_zeros_past_a_rows_length():
    """A shorter row's last partial group is zero-padded whatever the batch holds past its length (it took the
    caller's padding, and decoding or the loss of that row then depended on it)."""
    feats = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 7, 2)
    feats[1, 4:] = 5.0  # not zeros past row 1's 4 frames
    x, lens = stack_frames(feats, torch.tensor([7, 4]), 3, "pad")
    alone, _ = stack_frames(feats[1:, :4], torch.tensor([4]), 3, "pad")
    assert lens.tolist() == [3, 2]
    assert torch.equal(x[1, :2], alone[0])
    assert torch.equal(x[1, 1], torch.cat([feats[1, 3], torch.zeros(4)]))


@pytest.mark.parametrize("cheap, activation", [("sparse", "tanh"), ("lowrank", "relu")])
def test_loss_is_the_rnnt_loss_of_the_joint_plus_the_cost(cheap, activation):
    model = make_model(cheap, joint_activation=activation).eval()  # eval: deterministic decisions, so two passes agree
    feats, feat_lens, targets, target_lens = toy_batch()
    loss, stats = model.loss(feats, feat_lens, targets, target_lens, cost_weight=0.5)
    x, enc_lens = stack_frames(feats, feat_lens, 3)
    enc, aux = model.encoder(x, enc_lens)
    pred_p, _ = model.predict(torch.tensor([[0, 1, 3, 2], [0, 4, 5, 1]]))
    logits = model.joint(model.enc_proj(enc)[:, :, None], pred_p[:, None])
    rnnt = ak.rnnt_loss(logits, targets.clamp(min=1), enc_lens, target_lens, blank=0)
    assert stats["rnnt"] == pytest.approx(rnnt.item(), rel=1e-5)
    assert loss.item() == pytest.approx(rnnt.item() + 0.5 * aux["cost_fraction"].item(), rel=1e-5)
    assert 0 < stats["cost_fraction"] <= 1 and 0 < stats["p_full"] < 1
    budget_loss, budget_stats = model.loss(feats, feat_lens, targets, target_lens, cost_weight=0.5,
                                           budget=1.0)
    assert budget_stats["penalty"] == 0 and budget_loss.item() == pytest.approx(stats["rnnt"], rel=1e-5)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_loss_backpropagates_everywhere(cheap):
    model = make_model(cheap, per_layer_decisions=True, num_layers=2).train()
    loss, stats = model.loss(*toy_batch(), cost_weight=1.0, budget=0.1)
    assert torch.isfinite(loss) and set(stats) >= {"rnnt", "p_full", "cost_fraction"}
    assert all(isinstance(v, float) for v in stats.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("embedding"):  # the embedding rows of unused labels get no gradient
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_tiny_model_overfits_two_utterances_and_decodes_them(cheap):
    model = make_model(cheap, tau=0.5)
    feats, feat_lens, targets, target_lens = toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss, stats = model.loss(feats, feat_lens, targets, target_lens)
        loss.backward()
        opt.step()
        first = stats["rnnt"] if first is None else first
    assert stats["rnnt"] < first / 2
    model.eval()
    hyps = model.greedy_decode(feats, feat_lens)
    assert hyps == [[1, 3, 2], [4, 5]]


def test_greedy_decode_returns_valid_tokens_and_respects_the_cap():
    model = make_model("lowrank").eval()
    with torch.no_grad():
        model.out.bias[0] = -100.0  # the blank never wins: every frame emits exactly the cap
    feats, feat_lens, _, _ = toy_batch()
    hyps = model.greedy_decode(feats, feat_lens, max_symbols_per_frame=2)
    assert [len(h) for h in hyps] == [2 * 8, 2 * 7]
    assert all(1 <= t < V for h in hyps for t in h)


def test_model_rejects_bad_input():
    model = make_model()
    feats, feat_lens, targets, target_lens = toy_batch()
    with pytest.raises(ValueError, match="targets are empty"):
        model.loss(feats, feat_lens, targets[:, :0], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty targets"):
        model.loss(feats, feat_lens, targets, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"input_size=8"):
        model.loss(feats[..., :5], feat_lens, targets, target_lens)
    with pytest.raises(ValueError, match=r"input_size=8"):
        model.greedy_decode(feats[..., :5], feat_lens)
    with pytest.raises(ValueError, match="0 is the blank"):
        model.loss(feats, feat_lens, torch.tensor([[1, 0, 2], [4, 5, 0]]), target_lens)
    with pytest.raises(ValueError, match="feat_lens must lie"):
        model.loss(feats, torch.tensor([25, 19]), targets, target_lens)
    with pytest.raises(ValueError, match="budget"):
        model.loss(feats, feat_lens, targets, target_lens, cost_weight=1.0, budget=2.0)
    for bad in (float("nan"), float("inf"), torch.tensor(0.5), "0.5"):
        with pytest.raises(ValueError, match="cost_weight must be a finite number"):
            model.loss(feats, feat_lens, targets, target_lens, cost_weight=bad)
    # NumPy numbers are numbers (a config read with NumPy): the same loss as the Python float's
    model.eval()
    loss, _ = model.loss(feats, feat_lens, targets, target_lens, cost_weight=np.float32(0.5), budget=np.float64(0.1))
    assert type(loss) is torch.Tensor
    torch.testing.assert_close(loss, model.loss(feats, feat_lens, targets, target_lens, cost_weight=0.5, budget=0.1)[0])
    model.train()
    with pytest.raises(ValueError, match=r"no utterance \(B = 0\)"):
        model.loss(feats[:0], feat_lens[:0], targets[:0], target_lens[:0])
    for name, args in (("feat_lens", (feats, feat_lens > 0, targets, target_lens)),  # bool: not 1/0 lengths
                       ("targets", (feats, feat_lens, targets > 0, target_lens)),
                       ("target_lens", (feats, feat_lens, targets, target_lens > 0))):
        with pytest.raises(ValueError, match=f"{name} must be an integer tensor"):
            model.loss(*args)
    for call in (model.loss, model.greedy_decode):
        with pytest.raises(ValueError, match=r"feats are torch.float64 on cpu but the model's weights are"):
            call(feats.double(), feat_lens, *((targets, target_lens) if call == model.loss else ()))
    with pytest.raises(ValueError, match="vocab_size"):
        AmNetsRNNT(F_IN, 1, 32, 1)
    with pytest.raises(ValueError, match="joint_activation"):
        AmNetsRNNT(F_IN, V, 32, 1, joint_activation="gelu")


def test_package_exports():
    import amnets

    assert amnets.AmNetsEncoder is AmNetsEncoder and amnets.AmNetsRNNT is AmNetsRNNT
    assert amnets.simulate_latency is simulate_latency and "Interspeech 2021" in amnets.__doc__


@pytest.mark.parametrize("sparsity", [0.0, 0.99])  # an empty complement; no kept block at all
def test_sparse_stream_at_extreme_sparsity(sparsity):
    with pytest.warns(NotCheaperWarning, match="keeps no block" if sparsity else "no fewer MACs"):
        enc = make_encoder("sparse", sparsity=sparsity)
    x = torch.randn(2, 4, D)
    for force, weight in (("full", enc.full_weight), ("cheap", enc.cheap_weight)):
        out, _, _ = enc.stream(x, force=force)
        torch.testing.assert_close(out, lstm_stack(enc, weight)(x)[0], atol=1e-5, rtol=1e-5)
    assert enc.block_mask_l0.all() if sparsity == 0 else not enc.block_mask_l0.any()


# ---------------------------------------------------------------------------------------------------
# forced encoders: the dense baseline


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
@pytest.mark.parametrize("force", ["full", "cheap"])
def test_forced_encoder_is_the_plain_lstm_of_its_branch(cheap, force):
    enc = make_encoder(cheap, force=force).train()  # training mode: no Gumbel noise when forced
    x = torch.randn(3, 5, D)
    weight = enc.full_weight if force == "full" else enc.cheap_weight
    want = lstm_stack(enc, weight)(x)[0]
    out, aux = enc(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert aux["decisions"].all() == (force == "full") and aux["decisions"].any() == (force == "full")
    layers = sum(enc.layer_macs(k, force) for k in range(enc.num_layers))  # no arbitrator MACs
    torch.testing.assert_close(aux["expected_macs"], torch.full((3, 5), float(layers)))
    got, _, dec = enc.eval().stream(x)  # stream() follows the encoder's force by default
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert bool(dec.all()) == (force == "full")


def test_forced_full_encoder_leaves_the_arbitrator_unused():
    enc = make_encoder("sparse", force="full").train()
    enc(torch.randn(2, 4, D))[0].sum().backward()
    assert all(p.grad is None for p in enc.arbitrator.parameters())
    assert enc.weight_ih_l0.grad is not None


def test_encoder_rejects_unknown_force():
    with pytest.raises(ValueError, match="force"):
        make_encoder(force="dense")


def test_greedy_decode_returns_masked_decisions_and_realized_macs():
    model = make_model("sparse").eval()
    feats, feat_lens, _, _ = toy_batch()
    spread_arbitrator(model.encoder)
    hyps, decisions, enc_lens = model.greedy_decode(feats, feat_lens, return_decisions=True)
    assert hyps == model.greedy_decode(feats, feat_lens)
    x, want_lens = stack_frames(feats, feat_lens, model.stack)
    _, _, want = model.encoder.stream(x)
    assert enc_lens.tolist() == want_lens.tolist() == [8, 7]
    assert decisions[0].tolist() == want[0].tolist() and decisions[1, :7].tolist() == want[1, :7].tolist()
    assert not decisions[1, 7:].any() and 0 < int(decisions.sum()) < 15  # both branches taken
    enc = model.encoder
    macs = enc.realized_macs(decisions)
    full, cheap = enc.macs_per_frame("full"), enc.macs_per_frame("cheap")
    assert macs[decisions].tolist() == [full] * int(decisions.sum())
    assert macs[~decisions].tolist() == [cheap] * int((~decisions).sum())


def test_forward_is_the_loss():
    model = make_model("lowrank").eval()
    batch = toy_batch()
    assert model(*batch, cost_weight=0.3)[1] == model.loss(*batch, cost_weight=0.3)[1]


# ---------------------------------------------------------------------------------------------------
# defects found by probing: non-finite padding and weights, dtypes under autocast, argument checks


def test_nan_padding_leaves_encoder_output_and_stats_as_zero_padding_does():
    # Masking by multiplication kept the NaN (NaN * 0 = NaN): out, p_full, expected_macs and cost_fraction
    # of the row, and the batch, were NaN although padding "gives zeros".
    enc = make_encoder("sparse")
    x = torch.randn(2, 4, D)
    x[1, 2:] = 0.0
    lengths = torch.tensor([4, 2])
    want_out, want = enc(x, lengths)
    for junk in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 2:] = junk
        out, aux = enc(bad, lengths)
        assert torch.equal(out, want_out) and torch.equal(out[1, 2:], torch.zeros(2, H))
        for key in ("p_full", "expected_macs", "cost_fraction", "decisions"):
            assert torch.equal(aux[key], want[key]), key


@pytest.mark.parametrize("tail", ["pad", "drop"])
def test_nan_padding_gives_the_loss_and_gradients_of_zero_padding(tail):
    # stack_tail="drop" kept the padding of the last full groups as it was: the loss was NaN.
    model = make_model(stack_tail=tail)
    feats, _, targets, target_lens = toy_batch()
    feat_lens = torch.tensor([24, 17])
    feats[1, 17:] = 0.0

    def loss_and_grads(f):
        f = f.clone().requires_grad_()
        model.zero_grad()
        loss, stats = model.loss(f, feat_lens, targets, target_lens, cost_weight=1.0)
        loss.backward()
        return loss, stats, f.grad, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # One thread for both runs: the gradients are compared bit for bit, and a GEMM's sum order follows its
    # thread count, which the contention guard (csrc/cpu/parallel.h) lowers while another process holds a
    # core (CI failed once on out.weight's gradient, 3e-8 apart, with the xdist workers side by side).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(5)
        want = loss_and_grads(feats)
        bad = feats.clone()
        bad[1, 17:] = float("nan")
        torch.manual_seed(5)  # the same Gumbel noise
        got = loss_and_grads(bad)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(got[0]) and torch.equal(got[0], want[0]) and got[1] == want[1]
    assert torch.isfinite(got[2]).all() and torch.equal(got[2], want[2])
    assert all(torch.equal(g, w) for g, w in zip(got[3], want[3]))


def test_stack_frames_drop_reads_frames_past_the_length_as_zeros():
    feats = torch.ones(2, 7, 2)
    feats[1, 4:] = float("nan")
    out, lengths = stack_frames(feats, torch.tensor([7, 4]), 3, tail="drop")
    assert lengths.tolist() == [2, 1] and out.shape == (2, 2, 6)
    assert torch.equal(out[1, 1], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # frame 3 kept, 4 and 5 zero


@pytest.mark.parametrize("decode", ["greedy_decode", "beam_decode"])
def test_decoding_refuses_non_finite_weights_and_logits(decode):
    # An all-NaN joint decoded to the blank everywhere: empty hypotheses and no error.
    feats, feat_lens, _, _ = toy_batch()
    model = make_model().eval()
    with torch.no_grad():
        model.out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"AmNetsRNNT.{decode}: the model's weights hold NaN or inf \(out.bias\)"):
        getattr(model, decode)(feats, feat_lens)
    # finite weights whose products overflow: refused too
    class Times(torch.nn.Module):
        def forward(self, t):
            return t * 1e30

    model = make_model().eval()
    model.enc_proj = torch.nn.Sequential(model.enc_proj, Times(), Times())  # 1e60: inf in fp32
    with pytest.raises(ValueError, match=rf"{decode}: the model's encoder output is NaN or inf \(an overflow\)"):
        getattr(model, decode)(feats, feat_lens)


def test_autocast_takes_fp32_or_its_dtype_and_names_any_other():
    # fp64 and fp16 features under a bf16 autocast failed deep in a matmul with a RuntimeError.
    model = make_model()
    feats, feat_lens, targets, target_lens = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float64, torch.float16):
            with pytest.raises(ValueError, match=rf"AmNetsRNNT.loss: feats are {dtype} on cpu but the model's "
                                                 r"weights are torch.float32 on cpu \(under torch.autocast feats "
                                                 r"may also be torch.bfloat16\)"):
                model.loss(feats.to(dtype), feat_lens, targets, target_lens)
            with pytest.raises(ValueError, match=rf"AmNetsEncoder.forward: x is {dtype} on cpu"):
                model.encoder(torch.randn(2, 5, model.encoder.input_size, dtype=dtype))
        assert torch.isfinite(model.loss(feats, feat_lens, targets, target_lens)[0])  # fp32 still passes


def test_model_names_hidden_size_before_the_widths_that_default_to_it():
    with pytest.raises(ValueError, match="AmNetsRNNT: hidden_size must be an int >= 1; got 0"):
        AmNetsRNNT(4, 6, hidden_size=0, num_layers=1)


def test_encoder_tau_attribute_takes_any_real_number():
    enc = make_encoder("sparse").train()
    enc.tau = np.float32(0.5)  # was "tau must be > 0"
    assert enc(torch.randn(2, 3, D))[0].shape == (2, 3, H)
    for bad in (True, torch.tensor(0.5), np.float32(0), math.inf, math.nan):  # inf: every decision cheap
        enc.tau = bad
        with pytest.raises(ValueError, match="tau must be a finite real number > 0"):
            enc(torch.randn(2, 3, D))


@pytest.mark.parametrize("lengths", [torch.tensor([True, True]), torch.tensor([3 + 0j, 2])])
def test_encoder_lengths_must_be_integers(lengths):
    # bool was taken as 1/0; complex raised NotImplementedError
    with pytest.raises(ValueError, match=rf"lengths must be an integer tensor of shape \(B,\) = \(2,\); got a "
                                         rf"{lengths.dtype} tensor"):
        make_encoder("sparse")(torch.randn(2, 3, D), lengths)


@pytest.mark.parametrize("lengths", [[100, 10], [-1, 10], [11, 0]])
def test_stack_frames_range_checks_lengths(lengths):
    # [100, 10] gave lengths [34, 4] for 4 output frames; [-1, 10] gave -1
    with pytest.raises(ValueError, match=r"stack_frames: lengths must lie in \[0, T=10\]"):
        stack_frames(torch.randn(2, 10, 2), torch.tensor(lengths), 3)
    assert stack_frames(torch.randn(2, 10, 2), torch.tensor([0, 10]), 3)[1].tolist() == [0, 4]


def test_cost_model_methods_check_their_arguments():
    enc = make_encoder("sparse")  # L = 2 layers
    for k in (2, -1, 0.0, True):  # 2 returned a number for a layer that does not exist
        with pytest.raises(ValueError, match=r"layer_macs: k must be a layer index in \[0, num_layers=2\)"):
            enc.layer_macs(k, "full")
        with pytest.raises(ValueError, match=r"element_mask: k must be a layer index"):  # was AttributeError
            enc.element_mask(k)
        # the layer accessors too: AttributeErrors ('weight_ih_l2'), or layer_input_size(99) = H
        for accessor in ("full_weight", "cheap_weight", "layer_input_size"):
            with pytest.raises(ValueError, match=rf"{accessor}: k must be a layer index in \[0, num_layers=2\)"):
                getattr(enc, accessor)(k)
    with pytest.raises(ValueError, match=r"full_weight: k must be a layer index"):  # '0' was layer 0
        enc.full_weight("0")
    with pytest.raises(ValueError, match="lowrank_weights: only the low-rank cheap branch has factors"):
        enc.lowrank_weights(0)  # was an AttributeError ('w_ih_u_l0')
    assert len(make_encoder("lowrank").lowrank_weights(1)) == 4
    with pytest.raises(ValueError, match="layer_macs: branch must be 'full' or 'cheap'; got 'dense'"):
        enc.layer_macs(0, "dense")  # was the cheap branch's count
    with pytest.raises(ValueError, match="element_mask: only the sparse cheap branch has a mask"):
        make_encoder("lowrank").element_mask(0)
    for bad in (torch.ones(2, 3), torch.ones(2, 3, L, dtype=torch.bool), torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"realized_macs: decisions must be a bool tensor \(B, T\)"):
            enc.realized_macs(bad)
    per_layer = make_encoder("sparse", per_layer_decisions=True)
    with pytest.raises(ValueError, match=r"decisions must be a bool tensor \(B, T, num_layers=2\)"):
        per_layer.realized_macs(torch.ones(2, 3, dtype=torch.bool))
    assert per_layer.realized_macs(torch.ones(2, 3, L, dtype=torch.bool)).shape == (2, 3)


@pytest.mark.parametrize("costs, period, match", [
    ({0.02, 0.03}, 0.01, "frame_costs must be a sequence of numbers .*; got a set"),  # was one frame
    ({"a": 0.1}, 0.01, "got a dict"), ((c for c in [0.1]), 0.01, "got a generator"),
    ([10 ** 400], 0.01, "frame_costs must be finite"), ([0.1], 10 ** 400, "frame_period must be")])  # OverflowError
def test_latency_takes_a_sequence_of_finite_reals(costs, period, match):
    with pytest.raises(ValueError, match=match):
        simulate_latency(costs, period)
    assert simulate_latency(range(3), 1.0)["rtf"] == pytest.approx(1.0)  # a sequence of ints is fine


@pytest.mark.parametrize("block_size", [16, 8])  # on the frame engine, and on stream()'s steps (no engine for 8)
def test_a_streamer_keeps_the_settings_it_was_made_with(block_size):
    # The fallback streamer followed a later enc.force = "full"; the engine's kept deciding by the arbitrator.
    enc = make_encoder("sparse", block_size=block_size)
    frames = torch.randn(1, 12, D)
    _, _, want = enc.stream(frames)
    assert want.any() and not want.all()  # the arbitrator decides both ways here
    streamer = enc.streamer()
    enc.force = "full"
    _, got = streamer(frames)
    assert torch.equal(got, want)
    assert torch.equal(pickle.loads(pickle.dumps(streamer))(frames)[0], streamer.fork()(frames)[0])
    enc.force = None
    _, forced = enc.streamer(force="full")(frames)
    assert forced.all()


def test_loading_a_mask_that_saves_nothing_is_never_silent():
    enc = make_encoder("sparse")
    state = enc.state_dict()
    for fill, words in ((False, "keeps no block"), (True, "costs no fewer MACs")):
        state["block_mask_l0"] = torch.full_like(state["block_mask_l0"], fill)
        with pytest.warns(NotCheaperWarning, match=words):
            make_encoder("sparse").load_state_dict(state)


def test_sparsity_takes_any_real_number():
    # np.float32(0.5) was "sparsity must be a float in [0, 1)"
    assert make_encoder("sparse", sparsity=np.float32(0.5)).sparsity == 0.5
