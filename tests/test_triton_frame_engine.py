"""The Triton frame engine (amnets_kernels/triton/frame_engine.py) behind AmNetsEncoder.stream / .streamer on
CUDA tensors (and on CPU tensors under the interpreter with backend "triton"): the same decisions and
outputs as stream()'s per-layer steps on the reference faces, for every knob; chunks continue exactly; bad
input gets named errors. On a GPU (AMNETS_TEST_DEVICE=cuda) also: CUDA-graph replay equals eager launches,
and no host sync inside a chunk."""

import contextlib
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import amnets_kernels as ak
from amnets_kernels import _C
from amnets.encoder import AmNetsEncoder

from conftest import DEVICE

if ak.unavailable_reason("bsr_linear", "triton", DEVICE) is not None:
    pytest.skip(ak.unavailable_reason("bsr_linear", "triton", DEVICE), allow_module_level=True)

from amnets_kernels.triton import frame_engine as triton_engine  # noqa: E402  (imports triton)

BACKEND = "triton" if DEVICE == "cpu" else "auto"  # on CUDA, "auto" streams on the Triton engine


def per_layer_stream(enc, x, state=None, force=None, threshold=None):
    """stream() on the per-layer steps of the reference faces: the oracle."""
    with ak.use_backend("reference"):
        assert enc.frame_engine() is None
        return enc.stream(x, state, force=force, threshold=threshold)


def engine_stream(enc, x, state=None, force=None, threshold=None, split=None, fused=True):
    with ak.use_backend(BACKEND):
        engine = enc.frame_engine()
        assert engine is not None and engine.face == "triton"
        engine.split, engine.fused = split, fused
        return enc.stream(x, state, force=force, threshold=threshold)


configs = st.fixed_dictionaries(dict(
    cheap=st.sampled_from(["sparse", "lowrank"]), layers=st.integers(1, 3), hidden=st.sampled_from([8, 16, 40]),
    inp=st.sampled_from([5, 24]), block=st.sampled_from([16, 32]), per_layer=st.booleans(),
    uses_state=st.booleans(), batch=st.integers(1, 9), frames=st.integers(1, 4), threshold=st.floats(0.2, 0.8),
    force=st.sampled_from([None, "full", "cheap", "rows"]), split=st.sampled_from([1, 2, 3]),
    fused=st.booleans(), seed=st.integers(0, 2**16)))


def build(cfg, dtype=torch.float32, arbitrator_hidden=32):
    torch.manual_seed(cfg["seed"])
    enc = AmNetsEncoder(cfg["inp"], cfg["hidden"], num_layers=cfg["layers"], cheap=cfg["cheap"], sparsity=0.5,
                        block_size=cfg["block"], rank=4, per_layer_decisions=cfg["per_layer"],
                        arbitrator_uses_state=cfg["uses_state"], arbitrator_hidden=arbitrator_hidden)
    enc = enc.eval().to(DEVICE, dtype)
    x = torch.randn(cfg["batch"], cfg["frames"], cfg["inp"], device=DEVICE).to(dtype)
    force = torch.rand(cfg["batch"], device=DEVICE) < 0.5 if cfg["force"] == "rows" else cfg["force"]
    return enc, x, force


def same(a, b, tol=1e-6):
    """Chunk continuation and graph replay repeat the same kernels; on a GPU a different chunk shape may
    compile a differently vectorised variant (summation order), so outputs agree to rounding there."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def assert_same(got, want, tol=1e-5):
    (out, (h, c), dec), (out2, (h2, c2), dec2) = got, want
    assert torch.equal(dec, dec2)
    for a, b in ((out, out2), (h, h2), (c, c2)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@given(cfg=configs)
def test_engine_equals_the_per_layer_steps(cfg):
    enc, x, force = build(cfg)
    got = engine_stream(enc, x, force=force, threshold=cfg["threshold"], split=cfg["split"], fused=cfg["fused"])
    assert_same(got, per_layer_stream(enc, x, force=force, threshold=cfg["threshold"]))


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_fused_update_equals_its_own_launch(cheap):
    """The update fused into the gates launch (the last of a unit group's programs runs it) against its own
    launch: 20 rows are two row tiles of 16 (an arrival count each), H = 40 leaves padded units in the last
    group, two layers and frames reuse every count."""
    cfg = dict(cheap=cheap, layers=2, hidden=40, inp=24, block=16, per_layer=True, uses_state=True, batch=20,
               frames=2, threshold=0.5, force=None, seed=7)
    enc, x, _ = build(cfg)
    fused = engine_stream(enc, x, split=5, fused=True)  # 5 splits: two rounds of 4 loads in the update
    alone = engine_stream(enc, x, split=5, fused=False)
    assert torch.equal(fused[2], alone[2])
    for a, b in ((fused[0], alone[0]), (fused[1][0], alone[1][0]), (fused[1][1], alone[1][1])):
        same(a, b)
    assert_same(fused, per_layer_stream(enc, x))
    assert fused[2].any() and not fused[2].all()  # full and cheap rows in the tiles


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_chunks_and_streamer_continue_exactly(cheap):
    cfg = dict(cheap=cheap, layers=2, hidden=16, inp=5, block=16, per_layer=False, uses_state=True, batch=3,
               frames=5, threshold=0.5, force=None, seed=4)
    enc, x, _ = build(cfg)
    with ak.use_backend(BACKEND):
        whole, state, dec = enc.stream(x)
        first, mid, dec1 = enc.stream(x[:, :2])
        rest, last, dec2 = enc.stream(x[:, 2:], mid)
        streamer = enc.streamer(batch=3)
        assert streamer.native
        parts = [streamer(x[:, t:t + 1]) for t in range(x.shape[1])]
    same(torch.cat([first, rest], 1), whole)
    assert torch.equal(torch.cat([dec1, dec2], 1), dec)
    same(last[0], state[0])
    same(last[1], state[1])
    same(torch.cat([p[0] for p in parts], 1), whole)
    assert torch.equal(torch.cat([p[1] for p in parts], 1), dec)
    same(streamer.state[1], state[1])
    assert dec.any() and not dec.all()  # the arbitrator chose both branches: both paths were exercised
    with ak.use_backend(BACKEND):
        streamer.state = mid  # set back to the middle: the same continuation
        again, again_dec = streamer(x[:, 2:])
        streamer.reset()
        restart, _ = streamer(x[:, :2])
    same(again, rest)
    assert torch.equal(again_dec, dec2)
    same(restart, first)


@pytest.mark.parametrize("kept", [triton_engine.GRAPHS_KEPT, 1])
def test_streams_sharing_one_engine_keep_their_own_state(kept, monkeypatch):
    """A stream's state stays in the buffers of the chunk shape it last ran (no copy in on its next call of
    that shape): interleaved streams of one engine, stream() calls with a state of the same shape, chunk
    lengths that change, set/reset/fork and a dropped stream each take or give those buffers, and every stream
    still continues exactly as it would alone. kept = 1: every new shape drops the last one's buffers."""
    monkeypatch.setattr(triton_engine, "GRAPHS_KEPT", kept)
    cfg = dict(cheap="sparse", layers=2, hidden=16, inp=5, block=16, per_layer=False, uses_state=True, batch=2,
               frames=6, threshold=0.5, force=None, seed=3)
    enc, x, _ = build(cfg)
    y = torch.randn_like(x)
    want_x, want_y = per_layer_stream(enc, x), per_layer_stream(enc, y)
    with ak.use_backend(BACKEND):
        a, b, dropped = enc.streamer(batch=2), enc.streamer(batch=2), enc.streamer(batch=2)
        dropped(y[:, :1])  # holds the 1-frame buffers, then goes away
        del dropped
        got_a, got_b = [a(x[:, :1])], [b(y[:, :1])]  # b takes the buffers a holds
        got_a.append(a(x[:, 1:3]))  # another shape: a moves to the 2-frame buffers
        mid = enc.stream(x[:, :1])  # stream() with a state of that shape: evicts b from the 1-frame buffers
        torch.testing.assert_close(mid[0], want_x[0][:, :1], rtol=1e-5, atol=1e-5)
        got_b.append(b(y[:, 1:2]))
        fork = a.fork()
        got_a.append(a(x[:, 3:4]))
        state = b.state
        b.reset()
        b(x[:, :2])  # another stream's worth of frames, then its state is set back
        b.state = state
        got_b.append(b(y[:, 2:6]))
        got_fork = fork(x[:, 3:6])
        got_a.append(a(x[:, 4:6]))
    out_a, dec_a = (torch.cat(parts, 1) for parts in zip(*got_a))
    out_b, dec_b = (torch.cat(parts, 1) for parts in zip(*got_b))
    for out, dec, (want, _, want_dec) in ((out_a, dec_a, want_x), (out_b, dec_b, want_y)):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(dec, want_dec)
    torch.testing.assert_close(got_fork[0], want_x[0][:, 3:], rtol=1e-5, atol=1e-5)
    for mine, want in zip(a.state, want_x[1]):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


def test_a_stream_forced_per_row_forks_with_its_rows():
    cfg = dict(cheap="lowrank", layers=1, hidden=16, inp=5, block=16, per_layer=False, uses_state=False, batch=3,
               frames=3, threshold=0.5, force="rows", seed=9)
    enc, x, rows = build(cfg)
    with ak.use_backend(BACKEND):
        streamer = enc.streamer(batch=3, force=rows)
        streamer(x[:, :1])
        other = streamer.fork()
        want, got = streamer(x[:, 1:]), other(x[:, 1:])
    same(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[1], rows[:, None].expand(3, 2))


def test_streams_on_two_threads_share_one_engine():
    """Two streams of one engine called from two threads at once: the engine's lock keeps each call's
    buffers its own, so each stream gives what it gives alone."""
    cfg = dict(cheap="lowrank", layers=2, hidden=16, inp=5, block=16, per_layer=False, uses_state=True, batch=1,
               frames=5, threshold=0.5, force=None, seed=8)
    enc, x, _ = build(cfg)
    xs = [x, torch.randn_like(x)]
    want = [per_layer_stream(enc, v) for v in xs]
    results = [None, None]
    with ak.use_backend(BACKEND):
        streams = [enc.streamer(batch=1), enc.streamer(batch=1)]

        def run(i):
            with ak.use_backend(BACKEND):  # the backend is per thread
                results[i] = [streams[i](xs[i][:, t:t + 1]) for t in range(xs[i].shape[1])]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, (out, _, dec) in zip(results, want):
        torch.testing.assert_close(torch.cat([g[0] for g in got], 1), out, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.cat([g[1] for g in got], 1), dec)


def test_a_forked_streamer_continues_and_a_busy_stream_refuses_other_threads():
    """Streamer.fork() on the Triton engine's stream continues exactly as the original, then each goes its own
    way; while a call is inside the stream (held here by hand, as another thread would), every method raises
    the named error, as the CPU engine's stream does."""
    cfg = dict(cheap="lowrank", layers=2, hidden=16, inp=5, block=16, per_layer=False, uses_state=True, batch=2,
               frames=4, threshold=0.5, force=None, seed=6)
    enc, x, _ = build(cfg)
    with ak.use_backend(BACKEND):
        streamer = enc.streamer(batch=2)
        assert streamer.native
        streamer(x[:, :2])
        other = streamer.fork()
        want = streamer(x[:, 2:])
        got = other(x[:, 2:])
        same(got[0], want[0])
        assert torch.equal(got[1], want[1])
        other(x[:, 2:] * 3)
        same(streamer.state[0], enc.stream(x)[1][0])  # the original's state stayed
        live = streamer._live
        with live._one_thread:
            for attempt in (lambda: streamer(x[:, :1]), lambda: streamer.state, streamer.reset, streamer.fork,
                            lambda: setattr(streamer, "state", other.state)):
                with pytest.raises(RuntimeError, match="this stream is in use by another thread"):
                    attempt()
        streamer(x[:, :1])  # free again


def test_block_64_wide_arbitrator_and_four_layer_decisions():
    """The largest tile (b = 64), an arbitrator wider than one block (100 -> 128) and 4 per-layer decisions."""
    cfg = dict(cheap="sparse", layers=4, hidden=70, inp=24, block=64, per_layer=True, uses_state=True, batch=2,
               frames=2, threshold=0.5, force=None, seed=5)
    enc, x, _ = build(cfg, arbitrator_hidden=100)
    assert_same(engine_stream(enc, x), per_layer_stream(enc, x))


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
@pytest.mark.parametrize("batch", [1, 3])
def test_rows_of_more_than_four_blocks_a_program(cheap, batch):
    """Below 16 rows the walk over a gate row's blocks issues four blocks' loads at once: rows of 6 and 9 blocks
    of 16 (input 24, hidden 72) in one split cover a full group of four and a tail, full, cheap and arbitrated.
    One row (batch 1) sums its products after the loops (the blocks, the low-rank projection and U s): all-cheap
    frames are the ones that run the last two."""
    cfg = dict(cheap=cheap, layers=2, hidden=72, inp=24, block=16, per_layer=False, uses_state=True, batch=batch,
               frames=2, threshold=0.5, force=None, seed=11)
    enc, x, _ = build(cfg)
    for force in ("full", "cheap", None):
        assert_same(engine_stream(enc, x, force=force, split=1), per_layer_stream(enc, x, force=force))


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_bf16_weights(cheap):
    cfg = dict(cheap=cheap, layers=2, hidden=32, inp=24, block=16, per_layer=False, uses_state=False, batch=4,
               frames=4, threshold=0.5, force=None, seed=2)
    enc, x, _ = build(cfg, torch.bfloat16)
    for force in ("full", "cheap"):
        out, (h, c), _ = engine_stream(enc, x, force=force)
        assert out.dtype == h.dtype == c.dtype == torch.bfloat16
        want, _, _ = per_layer_stream(enc, x, force=force)
        torch.testing.assert_close(out.float(), want.float(), rtol=0.05, atol=0.03)
        half, mid, _ = engine_stream(enc, x[:, :2], force=force)
        rest, _, _ = engine_stream(enc, x[:, 2:], mid, force=force)
        same(torch.cat([half, rest], 1).float(), out.float(), tol=1e-2)
    dec, want = engine_stream(enc, x)[2], per_layer_stream(enc, x)[2]
    assert (dec == want).float().mean() >= 0.9  # a bf16 logit at the threshold may round either way


def test_which_engine_follows_the_backend():
    enc = AmNetsEncoder(8, 16, num_layers=1, cheap="sparse", block_size=16).eval().to(DEVICE)
    with ak.use_backend(BACKEND):
        assert enc.frame_engine().face == "triton"
    with ak.use_backend("reference"):
        assert enc.frame_engine() is None
    with ak.use_backend(BACKEND):
        streamer = enc.streamer()
    with ak.use_backend("reference"), pytest.raises(ValueError, match="this stream runs the Triton frame engine, "
                                                                       "which backend 'reference'"):
        streamer(torch.randn(1, 1, 8, device=DEVICE))  # made under the Triton engine: never run silently under another
    if DEVICE == "cpu":  # "auto" picks the cpu engine for CPU tensors: a Triton stream refuses it (it ran on)
        with pytest.raises(ValueError, match="this stream runs the Triton frame engine, which backend 'auto'"):
            streamer(torch.randn(1, 1, 8))
    odd = AmNetsEncoder(8, 16, num_layers=1, cheap="sparse", block_size=8).eval().to(DEVICE)
    with ak.use_backend(BACKEND):
        assert odd.frame_engine() is None  # block 8: the per-layer Triton faces run instead
        out, _, _ = odd.stream(torch.randn(1, 2, 8, device=DEVICE))
    assert out.shape == (1, 2, 16)
    # Past the engine's limits (9 per-layer decisions; it takes 8): the per-layer steps (the constructor raised)
    deep = AmNetsEncoder(5, 16, num_layers=triton_engine.MAX_DECISIONS + 1, per_layer_decisions=True).eval().to(DEVICE)
    x = torch.randn(2, 3, 5, device=DEVICE)
    with ak.use_backend(BACKEND):
        assert deep.frame_engine() is None
        out, state, dec = deep.stream(x)
        assert deep.streamer(batch=2)(x)[0].shape == out.shape
    want = per_layer_stream(deep, x)
    assert torch.equal(dec, want[2])
    torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-5)


def test_bad_input_gets_named_errors():
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="lowrank", rank=4).eval().to(DEVICE)
    with ak.use_backend(BACKEND):
        streamer = enc.streamer(batch=2)
        engine = enc.frame_engine()
        with pytest.raises(ValueError, match="feature dim 9"):
            streamer(torch.randn(2, 1, 9, device=DEVICE))
        with pytest.raises(ValueError, match="batch = 2 rows"):
            streamer(torch.randn(3, 1, 8, device=DEVICE))
        with pytest.raises(ValueError, match=r"x is torch.float64"):
            streamer(torch.randn(2, 1, 8, dtype=torch.float64, device=DEVICE))
    h = torch.zeros(2, 2, 16, device=DEVICE)
    x = torch.randn(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="FrameEngine: h must have shape"):
        engine.run(x, torch.zeros(2, 3, 16, device=DEVICE), h, 0, None, 0.0)
    with pytest.raises(ValueError, match="force = 2 needs rows"):
        engine.run(x, h, h, 2, None, 0.0)
    with pytest.raises(ValueError, match="FrameEngine: x must be"):
        engine.run(x[..., :7], h, h, 0, None, 0.0)
    for split in (0, 2**31):  # the tuning knob, set wrong
        engine.split = split
        with pytest.raises(ValueError, match="split must be in 1 .. "):
            engine.run(x, h, h, 0, None, 0.0)
    engine.split = None
    with pytest.raises(ValueError, match="block_size must be one of"):
        triton_engine.FrameEngine("sparse", [dict(full=torch.zeros(64, 24), bias=torch.zeros(64),
                                                  mask=torch.ones(64, 24, dtype=torch.bool))],
                                  [torch.zeros(4, 8), torch.zeros(4), torch.zeros(1, 4), torch.zeros(1)],
                                  8, False, False, 8)


def test_empty_chunks():
    enc = AmNetsEncoder(8, 16, num_layers=2, cheap="sparse", block_size=16).eval().to(DEVICE)
    h = torch.randn(2, 3, 16, device=DEVICE)
    with ak.use_backend(BACKEND):
        out, (h2, c2), dec = enc.stream(torch.randn(3, 0, 8, device=DEVICE), (h, h))
    assert out.shape == (3, 0, 16) and dec.shape == (3, 0) and torch.equal(h2, h)


def test_every_launch_is_an_aot_configuration():
    """_launch looks each configuration up in the AOT list (python -m amnets_kernels.aot compiles it):
    every launcher choice exists there."""
    names = {c.name for c in triton_engine.AOT_CONFIGS}
    for dtype in (torch.float32, torch.bfloat16):
        for rows in triton_engine.ROW_TILES:
            for b, lowrank in [(b, False) for b in triton_engine.SPARSE_BLOCKS] + \
                              [(b, True) for b in triton_engine.LOWRANK_TILES]:
                assert triton_engine._name(triton_engine._gates_kernel, dtype, dict(
                    B=b, BLOCK_M=rows, LOWRANK=lowrank, RANK_STEP=triton_engine.BLOCK_R)) in names
            assert triton_engine._name(triton_engine._project_kernel, dtype, dict(
                BLOCK_M=rows, **triton_engine._project_tile(rows))) in names
        for width in range(1, triton_engine.MAX_ARBITRATOR_WIDTH + 1, 7):
            for decisions in range(1, triton_engine.MAX_DECISIONS + 1):
                blocks = triton_engine._arbitrator_blocks(width, decisions)
                assert triton_engine._name(triton_engine._arbitrator_kernel, dtype, blocks) in names


class _ViewsOnly(TorchDispatchMode):
    """Inside a capture: any tensor op but a view fails (on a GPU it would be a node of the graph)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func.is_view, f"{func} inside a graph capture: the engine's graphs hold kernel launches only"
        return func(*args, **(kwargs or {}))


@pytest.fixture
def recorded_graphs(monkeypatch):
    """torch.cuda's graph API as the Triton engine uses it, on the CPU: a capture records the engine's kernel
    launches and runs none (as a capture runs none), a replay runs them again with the very arguments recorded,
    so the buffers they name are all a replay sees, as on a GPU. -> the list of graphs captured."""
    real, capturing, graphs = triton_engine._launch, [], []

    class Graph:
        def __init__(self):
            self.launches = []
            graphs.append(self)

        def replay(self):
            for args, kwargs in self.launches:
                real(*args, **kwargs)

    @contextlib.contextmanager
    def capture(graph):
        capturing.append(graph)
        try:
            with _ViewsOnly():
                yield
        finally:
            capturing.clear()

    def launch(*args, **kwargs):
        if capturing:
            capturing[0].launches.append((args, kwargs))
        else:
            real(*args, **kwargs)

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(triton_engine, "_launch", launch)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return graphs


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the next test replays real CUDA graphs")
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_graphs_hold_kernels_only_and_replay_as_eager_launches(cheap, recorded_graphs):
    """The graph path (chunk buffers, the two h buffers of odd chunks, decisions filled outside the graph) with
    the graphs emulated on the CPU (recorded_graphs): a capture holds the kernel launches alone, and streams
    replaying them (one-frame calls that switch h buffers each call, even chunks that keep it, a stream forced full,
    one forced per row and two arbitrated ones with other thresholds taking turns on one chunk shape, stream()
    in between) give the eager launches' results bit for bit."""
    cfg = dict(cheap=cheap, layers=2, hidden=16, inp=5, block=16, per_layer=True, uses_state=True, batch=3,
               frames=7, threshold=0.5, force=None, seed=12)
    enc, x, _ = build(cfg)
    some = torch.tensor([True, False, True])

    def play():
        with ak.use_backend(BACKEND):
            streams = [enc.streamer(batch=3, force="full"), enc.streamer(batch=3, force=some),
                       enc.streamer(batch=3), enc.streamer(batch=3, threshold=0.8)]
            got = [[] for _ in range(len(streams) + 1)]
            for lo, hi in ((0, 1), (1, 2), (2, 4), (4, 5), (5, 7)):
                for s, parts in zip(streams, got):
                    parts.append(s(x[:, lo:hi]))
                out, _, dec = enc.stream(x[:, lo:hi])  # from a zero state, on the shape the streams hold
                got[-1].append((out, dec))
        return [(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)) for parts in got]

    eager = play()
    with ak.use_backend(BACKEND):
        enc.frame_engine().graphs = True
    replayed = play()
    assert len(recorded_graphs) == 2 * 3 + 1 * 3  # odd chunks (1 frame) two parities, even (2) one; 3 codes
    for (out, dec), (want_out, want_dec) in zip(replayed, eager):
        assert torch.equal(out, want_out) and torch.equal(dec, want_dec)
    for (out, dec), force, threshold in zip(replayed, ("full", some, None, None), (0.5, 0.5, 0.5, 0.8)):
        want = per_layer_stream(enc, x, force=force, threshold=threshold)
        torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(dec, want[2])
    assert not torch.equal(replayed[2][1], replayed[3][1])  # the thresholds made other decisions


@pytest.mark.skipif(not hasattr(_C, "GraphCall"), reason="a build without its CUDA part has no _C.GraphCall")
def test_graph_call_checks_its_arguments_and_its_order():
    """_C.GraphCall (csrc/cuda/graph_call.cpp), which calls a chunk's graph: named errors for tensors off the GPU,
    results that are not one byte buffer holding out and decisions, a step out of order (begin, the launches, end,
    then function) and an x of another shape; on a GPU, a call copies x in, replays and returns out and decisions
    as views of one new buffer."""
    with pytest.raises(ValueError, match="GraphCall: x, results, out and decisions must be CUDA tensors on one"):
        _C.GraphCall(torch.zeros(2), torch.zeros(8, dtype=torch.uint8), torch.zeros(2), torch.zeros(2))
    if DEVICE != "cuda":
        return
    results = torch.zeros(16, dtype=torch.uint8, device="cuda")
    out, flags = results[:8].view(torch.float32), results[8:10].view(torch.bool)
    x = torch.zeros(2, device="cuda")
    with pytest.raises(ValueError, match="GraphCall: results must be a whole uint8 storage"):
        _C.GraphCall(x, results[:8], out, flags)
    with pytest.raises(ValueError, match="GraphCall: out and decisions must be non-empty views of results"):
        _C.GraphCall(x, results, torch.zeros(2, device="cuda"), flags)
    call = _C.GraphCall(x, results, out, flags)
    with pytest.raises(RuntimeError, match=r"GraphCall: function\(\) comes after end\(\)"):
        call.function()
    with pytest.raises(RuntimeError, match=r"GraphCall: end\(\) comes after begin\(\)"):
        call.end()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call.begin()
        out.copy_(x)
        out.add_(1)
        flags.fill_(True)
        call.end()
    torch.cuda.current_stream().wait_stream(side)
    with pytest.raises(RuntimeError, match=r"GraphCall: begin\(\) comes once, first"):
        call.begin()
    replay = call.function()
    got, got_flags = replay(torch.full((2,), 3.0, device="cuda"))
    assert got.tolist() == [4.0, 4.0] and got_flags.tolist() == [True, True]
    assert got.untyped_storage().data_ptr() == got_flags.untyped_storage().data_ptr() != results.data_ptr()
    with pytest.raises(ValueError, match=r"GraphCall: x must have shape \[2\], dtype Float"):
        replay(torch.zeros(3, device="cuda"))
    with pytest.raises(TypeError, match="GraphCall: x must be a tensor"):
        replay([1.0, 2.0])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and host syncs exist on a GPU")
@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_graph_replay_equals_eager_launches_and_never_syncs(cheap):
    cfg = dict(cheap=cheap, layers=3, hidden=64, inp=24, block=32, per_layer=True, uses_state=True, batch=5,
               frames=6, threshold=0.5, force=None, seed=6)
    enc, x, _ = build(cfg)
    engine = enc.frame_engine()
    assert engine.graphs
    got = enc.stream(x)
    engine.graphs = False
    assert_same(got, enc.stream(x))
    engine.graphs = True
    streamer = enc.streamer(batch=5)
    parts = [streamer(x[:, :1])]  # captures the T=1 graph (capture itself may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parts += [streamer(x[:, t:t + 1]) for t in range(1, x.shape[1])]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    same(torch.cat([p[0] for p in parts], 1), got[0])
    assert torch.equal(torch.cat([p[1] for p in parts], 1), got[2])
    same(streamer.state[0], got[1][0])
    same(streamer.state[1], got[1][1])
    # the graph's call: one native call (_C.GraphCall) where the build has its CUDA part; from Python the same
    assert engine.native_call == bool(ak.build_info()["cuda_archs"])
    native, engine.native_call = engine.native_call, False
    streamer = enc.streamer(batch=5)
    parts = [streamer(x[:, t:t + 1]) for t in range(x.shape[1])]
    engine.native_call = native
    same(torch.cat([p[0] for p in parts], 1), got[0])
    assert torch.equal(torch.cat([p[1] for p in parts], 1), got[2])
