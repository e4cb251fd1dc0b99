"""The CPU frame engine (csrc/cpu/frame_engine.cpp) behind AmNetsEncoder.stream and .streamer: the same
decisions and outputs as the per-layer prepared steps it replaces (and as the other faces' stream()), for
every knob; chunks continue exactly; bad input gets named errors."""

import copy
import itertools
import math
import pickle
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given
from hypothesis import strategies as st

import amnets.encoder as encoder_module
import amnets_kernels as ak
from amnets_kernels import _C
from amnets.encoder import AmNetsEncoder

from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu" or encoder_module._ENGINE is None,
                                reason="the frame engine is the cpu face's (and this build must have it)")


def prepared_steps_stream(enc, x, state=None, force=None, threshold=None):
    """stream() on the per-layer prepared steps: the path the engine replaces."""
    engine, enc._engine_cache = encoder_module._ENGINE, None
    encoder_module._ENGINE = None
    try:
        return enc.stream(x, state, force=force, threshold=threshold)
    finally:
        encoder_module._ENGINE = engine


configs = st.fixed_dictionaries(dict(
    cheap=st.sampled_from(["sparse", "lowrank"]), layers=st.integers(1, 3), hidden=st.sampled_from([8, 16, 40]),
    inp=st.sampled_from([5, 24]), block=st.sampled_from([16, 32]), per_layer=st.booleans(),
    # ranks clipped per matrix to its smaller side: with 20 and 48, factors 16-63 wide with odd tails, r_ih != r_hh
    rank=st.sampled_from([4, 20, 48]),
    uses_state=st.booleans(),
    # past 12 rows a branch's rows go through 16-row tiles, the rest (<= 12) through the few-row kernel
    batch=st.one_of(st.integers(1, 9), st.sampled_from([17, 29])), frames=st.integers(1, 7), threshold=st.floats(0.2, 0.8),
    force=st.sampled_from([None, "full", "cheap", "rows"]), seed=st.integers(0, 2**16)))


def build(cfg, dtype=torch.float32):
    torch.manual_seed(cfg["seed"])
    enc = AmNetsEncoder(cfg["inp"], cfg["hidden"], num_layers=cfg["layers"], cheap=cfg["cheap"], sparsity=0.5,
                        block_size=cfg["block"], rank=cfg.get("rank", 4), per_layer_decisions=cfg["per_layer"],
                        arbitrator_uses_state=cfg["uses_state"]).eval().to(dtype)
    x = torch.randn(cfg["batch"], cfg["frames"], cfg["inp"]).to(dtype)
    force = torch.rand(cfg["batch"]) < 0.5 if cfg["force"] == "rows" else cfg["force"]
    return enc, x, force


@given(cfg=configs)
def test_engine_equals_the_prepared_steps(cfg):
    enc, x, force = build(cfg)
    assert enc.frame_engine() is not None
    out, (h, c), dec = enc.stream(x, force=force, threshold=cfg["threshold"])
    want, (h2, c2), dec2 = prepared_steps_stream(enc, x, force=force, threshold=cfg["threshold"])
    assert torch.equal(dec, dec2)
    for got, expected in ((out, want), (h, h2), (c, c2)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_many_full_rows_take_the_gemm_and_mixed_rows_keep_their_places(cheap):
    """64 or more full rows of one layer are one ATen GEMM (kGemmRows); the rows of each branch are computed
    together in branch order and their states written back to their own rows (full and cheap rows interleaved
    here, so a row put back in the wrong place would show)."""
    torch.manual_seed(0)
    enc = AmNetsEncoder(24, 40, num_layers=2, cheap=cheap, sparsity=0.5, block_size=16, rank=20).eval()
    x = torch.randn(90, 3, 24)
    force = torch.arange(90) % 9 != 4  # 80 full rows, 10 cheap ones among them
    out, (h, c), dec = enc.stream(x, force=force)
    want, (h2, c2), dec2 = prepared_steps_stream(enc, x, force=force)
    assert torch.equal(dec, dec2) and dec.eq(force[:, None]).all()
    for got, expected in ((out, want), (h, h2), (c, c2)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A streamer of 64+ rows builds the GEMM's weights when it is made (stream() above, on the first such frame):
    # the same weights, so the same results.
    streamer = AmNetsEncoder(24, 40, num_layers=2, cheap=cheap, sparsity=0.5, block_size=16, rank=20).eval()
    streamer.load_state_dict(enc.state_dict())
    streamer = streamer.streamer(batch=90, force=force)
    assert torch.equal(streamer(x)[0], out)


@given(cfg=configs, cut=st.integers(0, 7))
def test_chunks_and_streamer_continue_exactly(cfg, cut):
    enc, x, force = build(cfg)
    cut = min(cut, x.shape[1])
    whole, state, dec = enc.stream(x, force=force, threshold=cfg["threshold"])
    first, mid, dec1 = enc.stream(x[:, :cut], force=force, threshold=cfg["threshold"])
    rest, last, dec2 = enc.stream(x[:, cut:], mid, force=force, threshold=cfg["threshold"])
    assert torch.equal(torch.cat([first, rest], 1), whole) and torch.equal(torch.cat([dec1, dec2], 1), dec)
    assert torch.equal(last[0], state[0]) and torch.equal(last[1], state[1])
    streamer = enc.streamer(batch=x.shape[0], threshold=cfg["threshold"], force=force)
    assert streamer.native
    parts = [streamer(x[:, t:t + 1]) for t in range(x.shape[1])]
    assert torch.equal(torch.cat([p[0] for p in parts], 1), whole)
    assert torch.equal(torch.cat([p[1] for p in parts], 1), dec)
    assert torch.equal(streamer.state[1], state[1])


def test_a_streamer_on_the_engine_refuses_a_backend_that_does_not_run_it():
    """A streamer made under "auto" runs the cpu frame engine; under "cpu" it still does, under "reference" or
    "cuda" (chosen after it was made) it raises instead of running the engine silently."""
    if DEVICE != "cpu":
        pytest.skip("the cpu frame engine")
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", block_size=16).eval()
    x = torch.randn(1, 3, 8)
    streamer = enc.streamer()
    assert streamer.native
    want, _ = streamer.fork()(x)
    with ak.use_backend("cpu"):
        assert torch.equal(streamer(x)[0], want)
    for backend in ("reference", "cuda"):
        with ak.use_backend(backend), pytest.raises(ValueError, match=f"this stream runs the cpu frame engine, "
                                                                       f"which backend '{backend}' \\(now in force\\)"):
            streamer(x)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_streamer_state_is_a_snapshot_and_can_be_set(backend):
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", block_size=16).eval()
    x = torch.randn(2, 4, 8)
    with ak.use_backend(backend):
        streamer = enc.streamer(batch=2)
        assert streamer.native == (backend == "auto")  # the engine keeps the state in place; stream() does not
        streamer(x[:, :2])
        mid = streamer.state
        kept = mid[0].clone(), mid[1].clone()
        rest, _ = streamer(x[:, 2:])
        assert torch.equal(mid[0], kept[0]) and torch.equal(mid[1], kept[1])  # read earlier: not changed since
        streamer.state = mid
        mid[0].zero_(), mid[1].zero_()  # the caller's tensors, edited after the assignment: not the stream's
        assert torch.equal(streamer(x[:, 2:])[0], rest)  # set back: the same continuation
        streamer.state = kept
        h, c = streamer.state
        h.zero_(), c.zero_()  # a read, edited: not the stream's either
        assert torch.equal(streamer(x[:, 2:])[0], rest)
        streamer.reset()
        first, _ = streamer(x[:, :2])
        assert torch.equal(first, enc.stream(x[:, :2])[0])
        with pytest.raises(ValueError, match="state must be"):
            streamer.state = (torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("how", ["fork", "copy", "deepcopy"])
def test_a_forked_streamer_continues_from_the_state_then_goes_its_own_way(backend, how):
    """A fork (or a copy) continues exactly as the original would, and afterwards each stream's calls leave
    the other's state alone; a per-row force travels with it."""
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="lowrank", rank=4).eval()
    x = torch.randn(2, 6, 8)
    with ak.use_backend(backend):
        streamer = enc.streamer(batch=2, force=torch.tensor([True, False]) if how == "copy" else None)
        streamer(x[:, :2])
        other = {"fork": streamer.fork, "copy": lambda: copy.copy(streamer),
                 "deepcopy": lambda: copy.deepcopy(streamer)}[how]()
        assert other.native == streamer.native == (backend == "auto")
        assert (other.encoder is enc) == (how != "deepcopy")
        want = streamer(x[:, 2:4])
        state = streamer.state
        got = other(x[:, 2:4])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        other(x[:, 4:] * 3)  # a different continuation: the original's state stays
        assert all(torch.equal(a, b) for a, b in zip(streamer.state, state))
        want = streamer(x[:, 4:])
        assert not torch.equal(other.state[0], streamer.state[0])
        other.state = state
        assert torch.equal(other(x[:, 4:])[0], want[0])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("force", [None, "full", "cheap", "rows"])
def test_a_pickled_streamer_continues_where_it_was(backend, force):
    """pickle (torch.save, multiprocessing) carries a live stream: its encoder, settings and state; the copy
    gets an engine of its own and continues exactly as the original does."""
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", sparsity=0.5, block_size=16).eval()
    x = torch.randn(2, 6, 8)
    with ak.use_backend(backend):
        streamer = enc.streamer(batch=2, threshold=0.3,
                                force=torch.tensor([True, False]) if force == "rows" else force)
        streamer(x[:, :3])
        other = pickle.loads(pickle.dumps(streamer))
        assert other.native == streamer.native == (backend == "auto") and other.encoder is not enc
        want, got = streamer(x[:, 3:]), other(x[:, 3:])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(torch.equal(a, b) for a, b in zip(other.state, streamer.state))


@pytest.mark.parametrize("face", ["reference", "triton"])
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_engine_equals_the_other_faces_stream(face, cheap):
    op = "bsr_linear" if cheap == "sparse" else "lowrank_lstm_cell"
    if ak.unavailable_reason(op, face, "cpu") is not None:
        pytest.skip(ak.unavailable_reason(op, face, "cpu"))
    cfg = dict(cheap=cheap, layers=2, hidden=16, inp=24, block=16, per_layer=True, uses_state=True, batch=3,
               frames=4, threshold=0.5, force=None, seed=1)
    enc, x, _ = build(cfg)
    out, state, dec = enc.stream(x)
    with ak.use_backend(face):
        engine = enc.frame_engine()  # reference: its faces run; triton: the Triton engine
        assert engine is None if face == "reference" else engine.face == "triton"
        want, want_state, want_dec = enc.stream(x)
    assert torch.equal(dec, want_dec)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_bf16_weights(cheap):
    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=False, batch=4,
               frames=5, threshold=0.5, force=None, seed=2)
    enc32, x32, _ = build(cfg)
    enc, x, _ = build(cfg, torch.bfloat16)
    for force in ("full", "cheap"):
        out, (h, c), _ = enc.stream(x, force=force)
        assert out.dtype == h.dtype == torch.bfloat16
        want, _, _ = enc32.to(torch.float32).stream(x32, force=force)  # fp32 math on bf16-rounded weights
        torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.03)
        enc32.to(torch.bfloat16)
        half, mid, _ = enc.stream(x[:, :2], force=force)
        rest, _, _ = enc.stream(x[:, 2:], mid, force=force)
        assert torch.equal(torch.cat([half, rest], 1), out)  # bf16 state between chunks: exact continuation
    enc32 = enc32.to(torch.float32)
    dec = enc.stream(x)[2]
    dec32 = enc32.stream(x32.bfloat16().float())[2]
    assert (dec == dec32).float().mean() >= 0.9  # the bf16 arbitrator may flip a frame at its threshold


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_stream_follows_every_weight_it_reads(cheap, backend):
    """stream() rebuilds its engine ("auto") or its per-layer steps ("reference") when any tensor they were
    built from changes (in place, through .data, replaced, swapped, a submodule replaced) or the backend does:
    each edit must show in the next call, as on a fresh copy of the encoder. The state is passed, so that on the
    engine stream() takes its native path (no Python checks, the engine's validity checked by
    _C.SourcesSnapshot). A streamed encoder still copies and pickles (its caches stay behind)."""
    import copy
    import io

    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=True, batch=3,
               frames=4, threshold=0.5, force=None, seed=5, rank=20)
    enc, x, _ = build(cfg)
    state = enc.stream(x[:, :1])[1]

    def replace(e, name, scale):
        setattr(e, name, torch.nn.Parameter(getattr(e, name) * scale))

    def new_arbitrator_output(e):
        last = torch.nn.Linear(e.arbitrator[2].in_features, e.arbitrator[2].out_features)
        last.bias.data.fill_(-0.2)
        e.arbitrator[2] = last

    edits = [lambda e: e.arbitrator[0].weight.mul_(-1.5), lambda e: e.arbitrator[2].bias.add_(0.7),
             lambda e: e.arbitrator[0].bias.data.copy_(torch.randn_like(e.arbitrator[0].bias)),
             lambda e: e.weight_hh_l1.mul_(0.5), lambda e: e.bias_l0.add_(0.3)]
    edits.append((lambda e: e.block_mask_l0.logical_not_()) if cheap == "sparse" else
                 (lambda e: e.w_hh_u_l1.mul_(2.0)))
    edits.append(lambda e: setattr(e.weight_ih_l0, "data", e.weight_ih_l0.data * 0.9))
    edits.append(lambda e: replace(e, "weight_ih_l1", 1.2))  # a new Parameter object
    edits.append(lambda e: replace(e, "w_ih_v_l0" if cheap == "lowrank" else "bias_l1", 0.8))
    edits.append(lambda e: torch.utils.swap_tensors(e.weight_hh_l0, torch.nn.Parameter(e.weight_hh_l0 * 1.1)))
    edits.append(new_arbitrator_output)
    edits.append(lambda e: e.load_state_dict({k: v * 0.95 if v.is_floating_point() else v
                                              for k, v in e.state_dict().items()}))
    with ak.use_backend(backend):
        for edit in edits:
            assert torch.equal(enc.stream(x, state)[0], enc.stream(x, state)[0])  # built, then from the cache
            with torch.no_grad():
                edit(enc)
            got, want = enc.stream(x, state), copy.deepcopy(enc).stream(x, state)
            assert torch.equal(got[2], want[2])
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    engine = enc.frame_engine()
    with ak.use_backend("reference"):
        assert enc.frame_engine() is None
        enc.stream(x, state, force="cheap")
    assert ak.last_face(encoder_module._CHEAP_OPS[cheap]) == "reference"  # its steps ran, not the engine
    assert enc.frame_engine() is engine  # the same weights under the same backend again: no rebuild
    torch.save(enc, io.BytesIO())


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_stream_follows_writes_that_bump_no_version(cheap, backend):
    """Writes no version counter records: torch.optim's fused=True steps (on the CPU they leave _version as
    it was; each advances the weights epoch through a global step hook) and in-place edits through
    .data or .numpy() (followed by ak.weights_changed()). Each must show in the next call, state passed (the
    native path), as on a fresh copy of the encoder."""
    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=True, batch=3,
               frames=4, threshold=0.5, force=None, seed=7, rank=20)
    enc, x, _ = build(cfg)
    state = enc.stream(x[:, :1])[1]
    packed = "weight_hh_l1" if cheap == "sparse" else "w_ih_u_l0"  # a weight the engine copies when built

    def fused_step(e):
        params = [p for p in e.parameters() if p.is_floating_point()]
        for p in params:
            p.grad = torch.randn_like(p)
        torch.optim.AdamW(params, lr=0.05, fused=DEVICE == "cpu").step()

    def through_data(e):
        e.weight_ih_l0.data.mul_(0.5)
        getattr(e, packed).data.mul_(-1.0)
        e.arbitrator[0].weight.data.mul_(2.0)
        ak.weights_changed()

    def through_numpy(e):
        getattr(e, packed).detach().cpu().numpy()[:] *= 1.5  # on a GPU a host copy: the edit is a no-op there
        ak.weights_changed()

    with ak.use_backend(backend):
        for edit in (fused_step, through_data, through_numpy):
            assert torch.equal(enc.stream(x, state)[0], enc.stream(x, state)[0])  # built, then from the cache
            edit(enc)
            got, want = enc.stream(x, state), copy.deepcopy(enc).stream(x, state)
            assert torch.equal(got[2], want[2])
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_only_a_fused_optimizer_step_rebuilds_every_engine():
    """The global step hook rebuilds every weight cache after a fused=True step (which bumps no version
    counter); any other torch.optim step, here on another model, leaves a served encoder's engine as it is."""
    cfg = dict(cheap="sparse", layers=1, hidden=16, inp=8, block=16, per_layer=False, uses_state=False,
               batch=1, frames=1, threshold=0.5, force=None, seed=1, rank=4)
    enc, _, _ = build(cfg)
    other = torch.nn.Linear(4, 4, device=DEVICE)
    other.weight.grad, other.bias.grad = torch.ones_like(other.weight), torch.ones_like(other.bias)
    engine = enc.frame_engine()
    for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        optimizer(other.parameters(), lr=0.1).step()
        assert enc.frame_engine() is engine, optimizer
    torch.optim.SGD(other.parameters(), lr=0.1, fused=True).step()
    assert enc.frame_engine() is not engine


def test_sources_snapshot_sees_each_kind_of_change():
    """_C.SourcesSnapshot (csrc/sources_snapshot.cpp), the check behind stream()'s caches, on its own: an entry
    written in place, re-pointed through .data (also to the same memory as another dtype or strides), swapped,
    replaced or removed no longer matches."""
    snapshot = encoder_module._C.SourcesSnapshot
    module = torch.nn.Linear(3, 2)
    d = {"w": torch.zeros(3), "m": module}
    buffer = np.zeros(3, dtype=np.float32)  # two storages over it: a re-point to the same address
    changes = [lambda: setattr(d["w"], "data", torch.from_numpy(buffer)),
               lambda: d["w"].add_(1.0), lambda: setattr(d["w"], "data", torch.ones(3)),
               lambda: torch.utils.swap_tensors(d["w"], torch.zeros(3)), lambda: d.update(m=torch.nn.Linear(3, 2)),
               lambda: d.update(w=d["w"].clone()), lambda: d.pop("w"),
               # the same memory seen anew: another dtype of the same width, other strides
               lambda: setattr(d["w"], "data", d["w"].data.view(torch.int32)),
               lambda: setattr(d["w"], "data", d["w"].data.as_strided((3,), (0,)))]
    d["w"].data = torch.from_numpy(buffer)
    for change in changes:
        snap = snapshot([(d, "w"), (d, "m")])
        assert snap.matches() and snap.matches()
        change()
        assert not snap.matches()
        d.setdefault("w", torch.zeros(3))
    d["w"] = torch.zeros(3)  # not the stride-0 view of the last change
    with pytest.raises(ValueError, match="no entry bias"):
        snapshot([(d, "bias")])
    with pytest.raises(TypeError, match="must be a dict"):
        snapshot([(list(d.items()), "w")])
    with pytest.raises(TypeError, match="third item \\(track_version\\) must be a bool; got str"):
        snapshot([(d, "w", "no")])
    keys = {torch.tensor(1): torch.zeros(1), 1: torch.zeros(1)}  # the first equal key is not the one looked up
    watch = snapshot([(keys, 1)])
    keys[1] = torch.ones(1)
    assert not watch.matches()
    follow = snapshot([(d, "w", False)])  # version left out: in-place writes match, a re-point does not
    d["w"].add_(1.0)
    assert follow.matches()
    d["w"].data = torch.ones(3)
    assert not follow.matches()


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_stream_caches_let_the_cycle_collector_free_the_encoder(cheap):
    """The engine's snapshot (and the native StreamCall holding it) keep the encoder's parameter dicts; with a
    parameter referring back to the encoder that is a cycle the collector must see, or the encoder leaks."""
    import gc
    import weakref

    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=True, batch=2,
               frames=3, threshold=0.5, force=None, seed=7, rank=8)
    enc, x, _ = build(cfg)
    enc.weight_ih_l0.owner = enc
    enc.stream(x)
    enc.stream(x, force="cheap")
    gone = weakref.ref(enc)
    del enc
    gc.collect()
    assert gone() is None


@pytest.mark.skipif(DEVICE != "cpu", reason="numpy buffers are host memory")
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_stream_sees_a_weight_re_pointed_to_a_new_buffer_at_the_old_address(cheap):
    """`param.data = new` keeps the parameter's version, and the new buffer may sit where the freed one was (a
    perturb-evaluate-restore loop over the weights): the snapshot pins the storage, not only the address. Two
    storages over one numpy buffer stand in for the allocator's reuse."""
    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=True, batch=3,
               frames=4, threshold=0.5, force=None, seed=7, rank=20)
    enc, x, _ = build(cfg)
    weight = getattr(enc, "weight_hh_l1" if cheap == "sparse" else "w_ih_u_l0")  # one the engine copies
    buffer = weight.detach().numpy().copy()
    weight.data = torch.from_numpy(buffer)
    state = enc.stream(x[:, :1])[1]
    assert torch.equal(enc.stream(x, state)[0], enc.stream(x, state)[0])  # built, then from the cache
    buffer *= -1.5
    weight.data = torch.from_numpy(buffer)  # another storage, same address, same version
    assert weight.data_ptr() == buffer.ctypes.data
    got, want = enc.stream(x, state), copy.deepcopy(enc).stream(x, state)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_stream_runs_natively_once_its_engine_is_built(monkeypatch):
    """Once its engine is built, stream() is one native call (_C.StreamCall): stream()'s Python checks do not run
    (the engine checks the frames, the state and a per-row force), and every result equals the checked path's:
    state None (zeros) or passed as a tuple or a list, every threshold's cut (logit(0) = -inf, logit(1) = inf;
    an int threshold), each force (a string, a per-row tensor, mixed or uniform), the encoder's own defaults."""
    cfg = dict(cheap="sparse", layers=2, hidden=16, inp=8, block=16, per_layer=False, uses_state=True, batch=2,
               frames=3, threshold=0.5, force=None, seed=0)
    enc, x, _ = build(cfg)
    state = enc.stream(x)[1]  # builds the engine
    rows = [torch.tensor([True, False]), torch.tensor([False, False]), torch.tensor([True, True])]
    calls = ([dict(state=None), dict(state=None, force="full")]
             + [dict(threshold=t) for t in (0.0, 0.3, 0.62, 1.0, 1)]
             + [dict(force=f) for f in ("full", "cheap", *rows)])
    # The checked path for the same calls: a numpy float is not a float to the native path.
    checked = [enc.stream(x, **{"state": state, **c, "threshold": np.float64(c.get("threshold", 0.5))})
               for c in calls]
    whole = checked[0]
    enc.force = "cheap"
    checked_default = enc.stream(x, state, threshold=np.float64(0.5))  # the encoder's own force
    enc.force = None

    def no_python_checks(*args):
        raise AssertionError("stream() ran its Python checks")

    monkeypatch.setattr(encoder_module, "_check_stream", no_python_checks)
    first, mid, _ = enc.stream(x[:, :1])
    rest, last, _ = enc.stream(x[:, 1:].clone().requires_grad_(), list(mid))  # grad mode on: no graph made
    assert not rest.requires_grad and not last[0].requires_grad
    assert torch.equal(torch.cat([first, rest], 1), whole[0]) and torch.equal(last[1], whole[1][1])
    for c, want in zip(calls, checked):
        got = enc.stream(x, **{"state": state, **c})
        assert all(torch.equal(g, w) for g, w in zip((got[0], *got[1], got[2]), (want[0], *want[1], want[2]))), c
    enc.threshold = 0.62
    assert torch.equal(enc.stream(x, state)[2], checked[4][2])  # the encoder's threshold when stream()'s is None
    enc.force = "cheap"
    assert torch.equal(enc.stream(x, state)[0], checked_default[0])
    for bad in (dict(force=True), dict(threshold=True), dict(threshold=np.float64(0.5)), dict(force="fast"),
                dict(force=torch.tensor([1, 0])), dict(force=torch.tensor([True])), dict(state=state[0])):
        with pytest.raises(AssertionError, match="Python checks"):  # not for the native path: the checked one
            enc.stream(x, **{"state": state, **bad})
    with pytest.raises(AssertionError, match="Python checks"):  # the engine refuses: the checked path names it
        enc.stream(x.double(), state)
    with ak.use_backend("reference"), pytest.raises(AssertionError, match="Python checks"):  # not its engine's
        enc.stream(x, state)


def test_stream_native_or_not_every_argument_gets_the_checked_paths_answer():
    """stream() over a grid of odd arguments (wrong kinds, shapes, dtypes, devices, layouts; NaN, huge and bool
    thresholds): the native call's result equals the checked path's on the same engine bit for bit, and
    what the checked path refuses is refused with a ValueError or TypeError, never another error or a crash."""
    torch.manual_seed(0)
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="lowrank", rank=4).eval()
    x = torch.randn(2, 3, 8)
    st = enc.stream(x)[1]
    xs = [x, x.transpose(0, 1).contiguous().transpose(0, 1), x[:, ::2], x.double(), x.to(torch.bfloat16),
          torch.randn(2, 3, 9), torch.randn(2, 8), torch.randn(2, 0, 8), "x", np.zeros((2, 3, 8), np.float32)]
    states = [None, st, list(st), (st[0],), (st[0], st[1], st[1]), (st[0].double(), st[1]), (st[0], "c"),
              (st[0].transpose(0, 2), st[1]), (st[0][:, :1], st[1][:, :1]),
              (st[0].transpose(1, 2).contiguous().transpose(1, 2), st[1]), st[0], (st[0].int(), st[1].int())]
    forces = [None, "full", "fast", True, torch.tensor([True, False]), torch.tensor([True]), torch.tensor([1, 0]),
              torch.tensor([[True, False]]), b"full", torch.ones(2, dtype=torch.bool, device="meta")]
    thresholds = [None, 0.0, 1, -0.1, math.nan, math.inf, True, 10**30, np.float64(0.3), "0.5", torch.tensor(0.5)]
    native = enc._engine_cache
    checked = native._replace(native=None)  # the same engine without its native call
    answered = 0
    for args in itertools.product(xs, states, forces, thresholds):
        results = []
        for hit in (native, checked):
            enc._engine_cache = hit
            try:
                results.append(enc.stream(*args))
            except (ValueError, TypeError) as e:
                results.append(type(e))
        got, want = results
        if isinstance(want, type):
            assert got is want, args
        else:
            answered += 1
            assert all(torch.equal(g, w) for g, w in zip((got[0], *got[1], got[2]), (want[0], *want[1], want[2])))
    assert answered > 100


def test_a_dropped_encoder_is_freed_with_its_weights():
    """The engine caches (the snapshot of the sources, StreamCall, streams and their forks) hold the encoder's
    dicts and tensors but nothing that holds the encoder: dropping it frees it at once, with no cycle for the
    garbage collector to find (pybind11 objects are opaque to it: a cycle through one would never be freed)."""
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="lowrank", rank=4).eval()
    x = torch.randn(1, 2, 8)
    enc.stream(x, enc.stream(x)[1])
    streamer = enc.streamer()
    other = streamer.fork()
    streamer(x), other(x)
    freed = weakref.ref(enc), weakref.ref(enc.weight_ih_l0), weakref.ref(enc._engine_cache.engine)
    del enc, streamer, other
    assert all(ref() is None for ref in freed)


def test_bf16_lowrank_frames_on_emulated_amx_tiles():
    """12 streams of bf16 low-rank frames: from 8 rows the engine's factor products run on AMX tiles where the
    CPU has them. Here on the scalar emulation of AMX (csrc/cpu/amx.h), against the vdpbf16ps frames: the same
    bf16 products summed in fp32 in another order, so the frames agree to far within a bf16 step."""
    from amnets_kernels import _backend

    if not ak.build_info()["cpu_bf16_lowrank_lstm_kernel"].startswith("avx512_bf16"):
        pytest.skip("the engine keeps bf16 factors on CPUs with AVX512-BF16 only")
    cfg = dict(cheap="lowrank", layers=2, hidden=40, inp=24, block=16, per_layer=False, uses_state=False, batch=12,
               frames=4, threshold=0.5, force=None, seed=3, rank=20)
    enc, x, _ = build(cfg, torch.bfloat16)
    want = enc.stream(x, force="cheap")[0]
    _backend._C.set_cpu_amx("emulate")
    try:
        got = enc.stream(x, force="cheap")[0]
    finally:
        _backend._C.set_cpu_amx("auto")
    torch.testing.assert_close(got.float(), want.float(), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("path", ["streamer", "stream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_are_handed_out_again_only_when_nothing_holds_them(dtype, path):
    """The engine and its stream reuse an output tensor once the caller has let go of it
    (csrc/cpu/frame_engine.cpp OutputPool): outputs and states kept as tensors, views or numpy arrays never
    change, a dropped tensor that asked for its gradient is not handed out again, and the frames equal the
    whole chunk's. "stream": stream() with each frame's state passed on, its native path (FrameEngine::run)."""
    cfg = dict(cheap="sparse", layers=2, hidden=16, inp=8, block=16, per_layer=False, uses_state=False, batch=2,
               frames=16, threshold=0.5, force=None, seed=3)
    enc, x, _ = build(cfg, dtype)
    whole, last, dec = enc.stream(x)
    streamer = enc.streamer(batch=2)
    state = enc.stream(x[:, :0])[1]  # zeros

    def frame(chunk):
        nonlocal state
        if path == "streamer":
            return streamer(chunk)
        out, state, d = enc.stream(chunk, state)
        return out, d

    copies, held, pointers = [], [], set()
    for t in range(x.shape[1]):
        out, d = frame(x[:, t:t + 1])
        assert not out.requires_grad and not out.is_inference()
        copies.append((out.clone(), d.clone()))
        pointers.add(out.data_ptr())
        if t == 1:
            held.append((out, out.clone()))
        if t == 2:
            held.append((out[1], out[1].clone()))
        if t == 3 and dtype == torch.float32:
            held.append((torch.from_numpy(out.numpy()), out.clone()))
        if t == 4:
            out.requires_grad_()  # then dropped
        if t == 5 and path == "stream":
            held += [(state[0], state[0].clone()), (state[1][0], state[1][0].clone())]
        del out, d
    assert torch.equal(torch.cat([c[0] for c in copies], 1), whole)
    assert torch.equal(torch.cat([c[1] for c in copies], 1), dec)
    if path == "stream":
        assert torch.equal(state[0], last[0]) and torch.equal(state[1], last[1])
    for kept, copy in held:
        assert torch.equal(kept, copy)
    assert len(pointers) < x.shape[1]  # dropped outputs came back
    with torch.inference_mode():
        out, _ = frame(x[:, :1])
        assert out.is_inference()  # not a tensor made outside inference mode
    out, _ = frame(x[:, :1])
    assert not out.is_inference()


def test_encoder_loaded_under_inference_mode_streams():
    with torch.inference_mode():
        enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", block_size=16).eval()
        out, _, _ = enc.stream(torch.randn(2, 3, 8))
        out2, _ = enc.streamer(batch=2)(torch.randn(2, 3, 8))
    assert out.shape == out2.shape == (2, 3, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_encoder_reloaded_under_inference_mode_streams_the_new_weights(cheap):
    """load_state_dict writes inference tensors in place (no version): the encoder says so itself, so the frame
    engine and per-layer steps built from the old weights are not used again."""
    torch.manual_seed(0)
    kw = dict(cheap=cheap, block_size=16) if cheap == "sparse" else dict(cheap=cheap, rank=4)
    x = torch.randn(2, 4, 8)
    with torch.inference_mode():
        enc = AmNetsEncoder(8, 16, num_layers=2, **kw).eval()
        enc.stream(x), enc.stream(x)
        other = {k: v.clone() if "mask" in k else v * 1.5 + 0.01 for k, v in enc.state_dict().items()}
        nn.Sequential(enc).load_state_dict({f"0.{k}": v for k, v in other.items()})
        fresh = AmNetsEncoder(8, 16, num_layers=2, **kw).eval()
        fresh.load_state_dict(other)
        for force in (None, "full", "cheap"):
            torch.testing.assert_close(enc.stream(x, force=force)[0], fresh.stream(x, force=force)[0], rtol=0, atol=0)


def test_a_state_of_another_layout_is_named_not_read():
    """A sparse (or mkldnn) tensor has the shape and dtype asked for but no strided storage: refused by name
    on every entry (the engine read its absent storage: a segfault)."""
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", block_size=16).eval()
    x = torch.randn(2, 3, 8)
    _, (h, c), _ = enc.stream(x)
    with pytest.raises(TypeError, match="h must be a dense"):
        enc.stream(x, (h.to_sparse(), c))
    with pytest.raises(TypeError, match="h must be a dense"):
        enc.streamer(batch=2).state = (h.to_sparse(), c)
    with pytest.raises(TypeError, match="x must be a dense"):
        enc.stream(x.to_sparse())
    with pytest.raises(TypeError, match="c must be a dense"):
        enc.frame_engine().run(x, h, c.to_sparse(), -1, None, 0.0)


def test_bad_input_gets_named_errors():
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="lowrank", rank=4).eval()
    streamer = enc.streamer(batch=2)
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but the encoder.s weights are torch.float32 on cpu; pass x.to"):
        enc.stream(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x is torch.float64"):
        streamer(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="feature dim 9"):
        streamer(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="batch = 2 rows"):
        streamer(torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="x must be a"):
        streamer("frames")
    with pytest.raises(ValueError, match="batch must be an int"):
        enc.streamer(batch=0)
    state = enc.stream(torch.randn(2, 1, 8))[1]  # with a state, stream() runs natively: the same errors
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but the encoder.s weights"):
        enc.stream(torch.randn(2, 3, 8, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="feature dim 9"):
        enc.stream(torch.randn(2, 3, 9), state)
    with pytest.raises(ValueError, match="x must be a"):
        enc.stream(torch.randn(2, 8), state)
    with pytest.raises(ValueError, match="state must be"):
        enc.stream(torch.randn(3, 1, 8), state)
    with pytest.raises(ValueError, match="state must be"):
        enc.stream(torch.randn(2, 1, 8), state[0])
    with pytest.raises(ValueError, match="threshold must be in"):
        enc.stream(torch.randn(2, 1, 8), state, threshold=1.5)
    with pytest.raises(ValueError, match="force must be None"):
        enc.stream(torch.randn(2, 1, 8), state, force="fast")
    for bad in (torch.float64, torch.int64):  # on the engine, and off it (the reference face's per-layer steps)
        wrong = tuple(s.to(bad) for s in state)
        with pytest.raises(TypeError, match=r"h must be"):
            enc.stream(torch.randn(2, 1, 8), wrong)
        with ak.use_backend("reference"), pytest.raises(TypeError, match=r"stream: state's h must be torch.float32"):
            enc.stream(torch.randn(2, 1, 8), wrong)
    with pytest.raises(ValueError, match="at least one frame"):
        enc(torch.randn(2, 0, 8))
    engine = enc.frame_engine()
    h = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="FrameEngine: h must have shape"):
        engine.run(torch.randn(2, 1, 8), torch.zeros(2, 3, 16), h, 0, None, 0.0)
    with pytest.raises(ValueError, match="force = 2 needs rows"):
        engine.run(torch.randn(2, 1, 8), h, h, 2, None, 0.0)
    with pytest.raises(ValueError, match="force = 2 needs rows, a .* on the CPU"):  # never read off the CPU
        engine.run(torch.randn(2, 1, 8), h, h, 2, torch.ones(2, dtype=torch.bool, device="meta"), 0.0)
    with pytest.raises(ValueError, match="force must be None"):  # a per-row force the engine refuses, named
        enc.stream(torch.randn(2, 1, 8), state, force=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="layer_tensors must hold 6"):
        encoder_module._ENGINE("lowrank", [torch.zeros(64, 24)], [], 8, False, False)


def test_weights_that_stream_from_memory_take_the_prefetching_kernel_and_agree():
    """A layer over 4 MB (here 2048 x 520 fp32) runs the kernel variant that prefetches ahead."""
    torch.manual_seed(3)
    enc = AmNetsEncoder(8, 512, num_layers=1, cheap="sparse", sparsity=0.5, block_size=32).eval()
    x = torch.randn(2, 2, 8)
    for force in ("full", "cheap"):
        out, _, _ = enc.stream(x, force=force)
        want, _, _ = prepared_steps_stream(enc, x, force=force)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_thread_counts_and_a_forked_child_give_the_same_frames():
    """The engine's loops run on our pool (csrc/cpu/parallel.h): chunks write disjoint outputs, so 1 or 2
    threads (the pool resized in between) give identical results, and a forked child (DataLoader workers),
    which inherits the pool but none of its threads, streams too (its caller does every chunk)."""
    import multiprocessing

    torch.manual_seed(7)
    enc = AmNetsEncoder(24, 512, num_layers=2, cheap="sparse", sparsity=0.5, block_size=32).eval()
    x = torch.randn(3, 4, 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = enc.stream(x)
        torch.set_num_threads(1)
        one = enc.stream(x)
        torch.set_num_threads(2)
        again = enc.stream(x)
    finally:
        torch.set_num_threads(threads)
    for a, b in ((two, one), (two, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    # The parent forks inside an OpenMP window of the contention guard (it opens one whenever its own threads
    # wait for each other: CI hung here once so). libgomp cannot run a team in the child of a process that ran
    # one, so the child must not inherit the window.
    _C.cpu_window("openmp", 60.0)
    try:
        # fork: the closure is not pickled; a list, not a tensor (torch shares tensors through the child's fds)
        child = ctx.Process(target=lambda: results.put((_C.cpu_contention()["openmp_for_ms"],
                                                        enc.stream(x)[0].tolist())))
        child.start()
    finally:
        _C.cpu_window("openmp", 0.0)
    try:
        window, out = results.get(timeout=120)  # a deadlocked pool or OpenMP team would time out here
    finally:
        child.join(timeout=10)
        child.kill()  # a hung child would otherwise outlive the test
    assert window == 0 and torch.equal(torch.tensor(out), two[0])


def spins_while(call) -> tuple[float, float]:
    """(counts per second of a spinning Python thread while this one sleeps, its counts while call() runs):
    call() holding the GIL lets it count for at most one switch interval (set to 0.1 ms here)."""
    import sys
    import threading
    import time

    count, done = [0], [False]

    def spin():
        while not done[0]:
            count[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        n0, t0 = count[0], time.perf_counter()
        time.sleep(0.05)
        rate = (count[0] - n0) / (time.perf_counter() - t0)
        n0, t0 = count[0], time.perf_counter()
        call()
        return rate, (count[0] - n0) / (time.perf_counter() - t0)
    finally:
        done[0] = True
        spinner.join()
        sys.setswitchinterval(interval)


@pytest.mark.serial  # a thread's counting rate: another test process on the CPU would disturb it
@pytest.mark.parametrize("path", ["streamer", "stream", "stream, state passed", "engine.run"])
def test_a_chunk_runs_with_the_gil_released(path):
    """A server runs live streams on Python threads, one each: a chunk must not hold the GIL (torch's own ops
    release it too). While a ~0.1 s chunk runs on this thread, a spinning thread keeps counting at a good part
    of its own rate (~100% here). With the GIL held, it counts only while the call's Python bytecodes hand the
    GIL back and forth, each time for at most a switch interval: 1-5% of a 50 ms chunk, measured with the
    release taken out of the stream() path."""
    torch.manual_seed(0)
    enc = AmNetsEncoder(24, 512, num_layers=2, cheap="sparse", sparsity=0.5, block_size=32).eval()
    x = torch.randn(1, 1000, 24)
    state = enc.stream(x[:, :1])[1]
    streamer = enc.streamer()
    call = {"streamer": lambda: streamer(x), "stream": lambda: enc.stream(x),
            "stream, state passed": lambda: enc.stream(x, state),
            "engine.run": lambda: enc.frame_engine().run(x, *state, 1, None, 0.0)}[path]
    call()
    rate, during = spins_while(call)
    assert during > 0.3 * rate, (during, rate)


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_streams_on_many_threads_equal_each_stream_run_alone(cheap):
    """Six live streams on one encoder, each on its own thread, all at once: three streamers and three
    stream() callers passing their state on (these share the engine and its output pool), chunks of 1-3 frames.
    Every stream's outputs and decisions equal the same stream run alone, bit for bit."""
    import threading

    torch.manual_seed(5)
    enc = AmNetsEncoder(24, 40, num_layers=2, cheap=cheap, sparsity=0.5, block_size=16, rank=8).eval()
    chunks = [[torch.randn(2, int(n), 24) for n in torch.randint(1, 4, (40,))] for _ in range(6)]

    def run(k, start=None):
        streamer, state, outs = enc.streamer(batch=2), None, []
        if start is not None:
            start.wait()
        for x in chunks[k]:
            if k < 3:
                outs.append(streamer(x))
            else:
                out, state, d = enc.stream(x, state)
                outs.append((out, d))
        return outs

    alone = [run(k) for k in range(6)]
    together, start = [None] * 6, threading.Barrier(6)
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, run(k, start))) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert len(a) == len(b) == 40
        for (out_a, d_a), (out_b, d_b) in zip(a, b):
            assert torch.equal(out_a, out_b) and torch.equal(d_a, d_b)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_one_stream_on_two_threads_at_once_is_refused_not_torn(backend):
    """A streamer holds one state: while a chunk runs on one thread (the GIL released), another thread's call,
    state read or write, reset or fork of the same streamer raises a named RuntimeError, and the running chunk
    ends as if alone. On the engine (auto) and off it (reference: stream()'s per-layer steps). Off the engine the
    probe's own state read holds the stream for a moment, and the runner retries if that refused its call.
    A trial whose chunk ended before the probes were done (this thread descheduled that long: a loaded CI
    machine, 2026-12-04) proves nothing either way and is run again with a new streamer, up to 3 times."""
    import threading

    torch.manual_seed(1)
    enc = AmNetsEncoder(24, 512, num_layers=2, cheap="sparse", sparsity=0.5, block_size=32).eval()
    x = torch.randn(1, 1000, 24)
    with ak.use_backend(backend):  # (on this thread)
        want, last = enc.streamer()(x), enc.stream(x)[1]
    zeros = enc.stream(x[:, :0])[1]

    def trial():
        """True when every probe was refused while the chunk ran; False when the chunk ended first."""
        with ak.use_backend(backend):
            streamer, got = enc.streamer(), []
        assert streamer.native == (backend == "auto")
        attempts = [lambda: streamer(x[:, :1]), lambda: streamer.state, lambda: setattr(streamer, "state", zeros),
                    streamer.reset, streamer.fork]

        def run():
            with ak.use_backend(backend):
                while not got:
                    try:
                        got.append(streamer(x))
                    except RuntimeError:  # this thread's probe (below) was inside the stream just then: try again
                        pass

        runner = threading.Thread(target=run)
        runner.start()
        try:
            while True:  # until the runner is inside its chunk (reading the state leaves the stream as it is)
                try:
                    streamer.state
                except RuntimeError:
                    break
                assert runner.is_alive(), "the runner's chunk ended before this thread saw it running"
            for attempt in attempts:  # (microseconds each: the chunk runs ~0.2 s)
                try:
                    attempt()
                except RuntimeError as exc:
                    assert "this stream is in use by another thread" in str(exc)
                    continue
                runner.join(0.05)  # a chunk that was ending ends now; one let in beside a probe runs on ~0.2 s
                assert not runner.is_alive(), "a probe was let in while the chunk ran"
                return False  # the chunk had ended: this probe (and any after it) went in legitimately
        finally:
            runner.join()
        assert torch.equal(got[0][0], want[0]) and torch.equal(got[0][1], want[1])
        assert torch.equal(streamer.state[0], last[0]) and torch.equal(streamer.state[1], last[1])
        return True

    assert any(trial() for _ in range(3)), "in 3 trials the chunk always ended before the probes were done"


def test_threads_streaming_on_one_engine_do_not_deadlock():
    """Regression: four threads calling stream() on one encoder, chunks of 1-5 frames, hung within seconds
    (3 of 3 runs of this script on the build before the fix): a thread evicting an output from the engine's pool
    under its lock freed a tensor with a Python object, which released the GIL inside torch, while another
    thread held the GIL and waited for the lock. Run in a child process: a deadlock holds the GIL."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading, torch
        from amnets.encoder import AmNetsEncoder
        torch.set_num_threads(1)
        torch.manual_seed(0)
        enc = AmNetsEncoder(24, 32, num_layers=2, cheap="sparse", sparsity=0.5, block_size=16).eval()
        xs = [torch.randn(1, n, 24) for n in (1, 2, 3, 5)]
        def work(k):
            state = None
            for i in range(3000):
                _, state, _ = enc.stream(xs[(i + k) % 4], state)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("done")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("four threads streaming on one encoder did not finish in 120 s (a deadlock)")
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
