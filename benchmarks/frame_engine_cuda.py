"""python -m benchmarks.frame_engine_cuda [--quick]: issue 12's GPU targets for the Triton frame engine
(amnets_kernels/triton/frame_engine.py), on the path users run (AmNetsEncoder.streamer(), one call per frame
unless said; each call replays the chunk's CUDA graph). For benchmarks/gpu_suite.sh.

Rows (wall time per call over a ~0.2 s loop with the queue drained before and after, 5 interleaved rounds,
medians; fp32):
  HBM read bandwidth: the best of 5 sums over a 1 GiB tensor;
  H=1024 x3, D=240, B=1 (sparse 0.8 b=32 / low-rank r=128): all-full frame / time to read its dense
      weights once from HBM, goal <= 2; all-cheap / all-full frame, goal <= 0.3; the arbitrated frame and
      16-frame chunks for scale; no host sync in 10 streamed frames (torch.cuda.set_sync_debug_mode("error"));
  a one-frame call (H=1024 x3 and H=192 x2, sparse, all-full and all-cheap) with a chunk's graph called natively
      (_C.GraphCall) and from Python (FrameEngine.native_call = False), interleaved;
  H=192 x2, D=240, B=1: arbitrated all-cheap / dense frame (threshold 1), goal 1 - 0.9 (1 - MAC ratio); the
      dense frame / cuDNN nn.LSTM stepped one frame per call, goal <= 0.5;
  H=1024 x3, B=64, chunks of 10: t(f) / (f t_full + (1 - f) t_cheap) at f = 0.25, 0.5, 0.75, goal <= 1.2;
  where the time of a B=1 frame goes (torch.profiler over 20 streamed frames, all-full and all-cheap): kernel
      launches a frame and device time per kernel name, against the wall time of a call (the first H200 run,
      2026-12-04, found 60-100 us a frame whatever the frame computed);
  tuning, H=1024 x3 B=1: 16-frame chunks at each split (programs per block row; the default is untuned) and
      with the LSTM update as its own launch (FrameEngine.fused = False: 7 launches a frame, not 4), and a
      one-frame call with CUDA graphs off (its launches from the host), all-full and all-cheap; sparse B=64
      mixed: f = 0, 0.25, 1 and t(0.25) / interpolation at more splits than the default.
Each row runs on its own: one that fails prints its error and the others still run.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from .frame_engine import encoder, frame, interleaved, lstm_stepper, ratio, target_row
from .harness import command_line

DEVICE = "cuda"
CHUNK = 16  # frames per call of the B=1 chunk row
MIXED_BATCH, MIXED_CHUNK = 64, 10  # the mixed-batch rows
PROFILED_FRAMES = 20  # frames under the profiler, per profile row
SPLITS = (None, 1, 2, 4, 8, 16, 32)  # the tuning rows' splits (None: the engine's own choice)
MIXED_SPLITS = (None, 4, 8, 16)  # the mixed-batch tuning row's


def hbm_read_gbs(gib: float = 1.0) -> float:
    """Read bandwidth in GB/s: the best of 5 timed sums over `gib` GiB of fp32."""
    x = torch.ones(int(gib * 2**28), device=DEVICE)
    best = float("inf")
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return x.numel() * 4 / best / 1e9


def dense_bytes(enc) -> int:
    return sum(enc.full_weight(k).numel() * enc.full_weight(k).element_size() for k in range(enc.num_layers))


def no_host_sync(streamer, x, frames: int = 10) -> str:
    streamer(x)  # the graph is captured on the first call of a shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(frames):
            streamer(x)
    except RuntimeError as exc:
        return f"host sync: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "none"


def profile_frames(streamer, x) -> list[str]:
    """Lines saying where PROFILED_FRAMES streamed calls spend their time: wall time a call, kernel launches a frame,
    device time a frame, and the kernels by total device time (name, launches a frame, us a frame)."""
    from torch.profiler import ProfilerActivity, profile

    frames = PROFILED_FRAMES
    streamer(x)  # the chunk's graph is captured on the first call of a shape, outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(frames):
            streamer(x)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / frames * 1e6
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in kernels) / frames
    launches = sum(e.count for e in kernels) / frames
    lines = [f"wall {wall:.1f} us a call (profiled); {launches:.1f} kernels and {device_us:.1f} us of device time a frame"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]:
        lines.append(f"{e.key[:60]}: {e.count / frames:.1f} a frame, {e.self_device_time_total / frames:.1f} us")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = command_line(__doc__, "benchmarks.frame_engine_cuda")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, short loops")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.frame_engine_cuda: no CUDA GPU; nothing measured")
        return
    rounds, seconds = (1, 0.05) if args.quick else (5, 0.2)
    sync = torch.cuda.synchronize
    print(f"# frame engine on {torch.cuda.get_device_name()}: torch {torch.__version__}, {rounds} rounds\n")
    print("| row | measured | goal | met |\n|---|---|---|---|")

    def row(name, fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on: every row is worth having
            print(f"| {name} | FAILED | | |\n```\n{traceback.format_exc(limit=4)}```")

    bandwidth = {}

    def hbm():
        bandwidth["gbs"] = hbm_read_gbs()
        print(f"| HBM read bandwidth (sum over 1 GiB) | {bandwidth['gbs']:.0f} GB/s | | |")

    def big_b1(cheap):
        enc = encoder(240, 1024, 3, cheap, DEVICE, rank=128)
        x, chunk = torch.randn(1, 1, 240, device=DEVICE), torch.randn(1, CHUNK, 240, device=DEVICE)
        full, cheap_s = enc.streamer(force="full"), enc.streamer(force="cheap")
        assert getattr(enc.frame_engine(), "face", None) == "triton", "the frame engine is not the Triton one"
        times = interleaved({"full": frame(full, x), "cheap": frame(cheap_s, x),
                             "arbitrated": frame(enc.streamer(), x),
                             "full chunk": frame(enc.streamer(force="full"), chunk)}, rounds, seconds, sync)
        read_us = dense_bytes(enc) / (bandwidth.get("gbs") or hbm_read_gbs()) / 1e3
        med = {k: statistics.median(v) for k, v in times.items()}
        target_row(f"H=1024 x3 {cheap} B=1: all-full frame / dense weights read once ({med['full']:.1f} / {read_us:.1f} us;"
                   f" {CHUNK}-frame chunks {med['full chunk'] / CHUNK:.1f} us a frame; arbitrated {med['arbitrated']:.1f} us)",
                   statistics.median(t / read_us for t in times["full"]), 2.0)
        target_row(f"H=1024 x3 {cheap} B=1: all-cheap / all-full frame ({med['cheap']:.1f} / {med['full']:.1f} us)",
                   ratio(times, "cheap", lambda i: times["full"][i]), 0.3)
        print(f"| H=1024 x3 {cheap} B=1: host syncs in 10 arbitrated streamed frames | "
              f"{no_host_sync(enc.streamer(), x)} | none | |")

    def small(cheap):
        enc = encoder(240, 192, 2, cheap, DEVICE)
        x = torch.randn(1, 1, 240, device=DEVICE)
        macs = enc.macs_per_frame("cheap") / enc.macs_per_frame("full")
        times = interleaved({"cheap": frame(enc.streamer(threshold=1.0), x),
                             "dense": frame(enc.streamer(force="full"), x), "nn.LSTM": lstm_stepper(enc, x)},
                            rounds, seconds, sync)
        med = {k: statistics.median(v) for k, v in times.items()}
        target_row(f"H=192 x2 {cheap} B=1: arbitrated all-cheap / dense frame ({med['cheap']:.1f} / {med['dense']:.1f} us;"
                   f" MAC ratio {macs:.2f})", ratio(times, "cheap", lambda i: times["dense"][i]), 1 - 0.9 * (1 - macs))
        target_row(f"H=192 x2 {cheap} B=1: dense frame / cuDNN nn.LSTM stepped per frame ({med['dense']:.1f} / "
                   f"{med['nn.LSTM']:.1f} us)", ratio(times, "dense", lambda i: times["nn.LSTM"][i]), 0.5)

    def mixed_frames(enc, fractions) -> dict:
        """{f: [us a frame per round]}: chunks of MIXED_BATCH rows, the first f of them forced full."""
        x = torch.randn(MIXED_BATCH, MIXED_CHUNK, 240, device=DEVICE)
        rows = torch.arange(MIXED_BATCH, device=DEVICE)
        candidates = {f: frame(enc.streamer(batch=MIXED_BATCH, force=rows < round(f * MIXED_BATCH)), x)
                      for f in fractions}
        return {f: [t / MIXED_CHUNK for t in ts] for f, ts in interleaved(candidates, rounds, seconds, sync).items()}

    def interpolated(times, f) -> float:
        return ratio(times, f, lambda i: f * times[1.0][i] + (1 - f) * times[0.0][i])

    def mixed(cheap):
        times = mixed_frames(encoder(240, 1024, 3, cheap, DEVICE, rank=128), (0.0, 0.25, 0.5, 0.75, 1.0))
        med = {f: statistics.median(t) for f, t in times.items()}
        for f in (0.25, 0.5, 0.75):
            target_row(f"H=1024 x3 {cheap} B={MIXED_BATCH}, f={f}: t(f) / interpolation ({med[f]:.1f} us a frame; "
                       f"all-cheap {med[0.0]:.1f}, all-full {med[1.0]:.1f})", interpolated(times, f), 1.2)

    def mixed_tuning():
        """The mixed rows missed at f = 0.25 (2026-12-04 run4: 1.50): a 16-row tile of full rows walks 5x the blocks
        of a cheap one, and at the default split (2 at B=64) a program is long: the grid's tail may be one such
        program. The same rows at more programs per block row."""
        enc = encoder(240, 1024, 3, "sparse", DEVICE, rank=128)
        engine, cells = enc.frame_engine(), []
        try:
            for split in MIXED_SPLITS:  # one split at a time: one graph alive, none recaptured inside the timing
                engine.split = split
                times = mixed_frames(enc, (0.0, 0.25, 1.0))
                med = "/".join(f"{statistics.median(times[f]):.0f}" for f in (0.0, 0.25, 1.0))
                cells.append(f"{split or 'default'}: {med} us, {interpolated(times, 0.25):.2f}")
        finally:
            engine.split = None
        print(f"| H=1024 x3 sparse B={MIXED_BATCH}: us a frame at f = 0 / 0.25 / 1 and t(0.25) / interpolation, by split"
              f" | {'; '.join(cells)} | | |")

    def where(cheap):
        enc = encoder(240, 1024, 3, cheap, DEVICE, rank=128)
        x = torch.randn(1, 1, 240, device=DEVICE)
        for force in ("full", "cheap"):
            for line in profile_frames(enc.streamer(force=force), x):
                print(f"| H=1024 x3 {cheap} B=1 {force}: where a frame's time goes | {line} | | |")

    def graph_calls():
        """us a one-frame call, a chunk's graph called natively (_C.GraphCall: x in, replay, output and decisions out
        in one copy, one C++ call) and from Python (four calls through the binding layer), interleaved, sparse B=1."""
        for hidden, layers in ((1024, 3), (192, 2)):
            enc = encoder(240, hidden, layers, "sparse", DEVICE)
            engine = enc.frame_engine()
            name = (f"H={hidden} x{layers} sparse B=1: us a one-frame call (full/cheap), the graph called natively"
                    " / from Python")
            if engine.graphs and not engine.native_call:
                print(f"| {name} | no native call here (see the warning) | | |")
                return
            x = torch.randn(1, 1, 240, device=DEVICE)
            candidates = {}
            for native in (True, False):
                for force in ("full", "cheap"):
                    stream = enc.streamer(force=force)

                    def call(stream=stream, native=native):  # the setting is read at each call: set it first
                        engine.native_call = native
                        return stream(x)

                    candidates[(force, native)] = call
            try:
                times = interleaved(candidates, rounds, seconds, sync)
            finally:
                engine.native_call = True
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {med[('full', True)]:.1f}/{med[('cheap', True)]:.1f} / "
                  f"{med[('full', False)]:.1f}/{med[('cheap', False)]:.1f} | | |")

    def tuning(cheap):
        enc = encoder(240, 1024, 3, cheap, DEVICE, rank=128)
        x, chunk = torch.randn(1, 1, 240, device=DEVICE), torch.randn(1, CHUNK, 240, device=DEVICE)
        full, cheap_s = enc.streamer(force="full"), enc.streamer(force="cheap")
        engine = enc.frame_engine()

        def a_frame(one, chunked=True):
            times = interleaved({"full": frame(full, one), "cheap": frame(cheap_s, one)}, rounds, seconds, sync)
            per = CHUNK if chunked else 1
            return "/".join(f"{statistics.median(times[k]) / per:.1f}" for k in ("full", "cheap"))

        cells = []
        for split in SPLITS:  # one split at a time: two graphs alive, none recaptured inside the timing
            engine.split = split
            cells.append(f"{split or 'default'}: {a_frame(chunk)}")
        engine.split, engine.fused = None, False
        try:
            cells.append(f"default, the update its own launch: {a_frame(chunk)}")
        finally:
            engine.fused = True
        print(f"| H=1024 x3 {cheap} B=1: us a frame (full/cheap) in {CHUNK}-frame chunks, by split | "
              f"{'; '.join(cells)} | | |")
        graphs, engine.graphs = engine.graphs, False
        try:
            print(f"| H=1024 x3 {cheap} B=1: us a one-frame call (full/cheap) without CUDA graphs | "
                  f"{a_frame(x, chunked=False)} | | |")
        finally:
            engine.graphs = graphs

    row("HBM read bandwidth", hbm)
    for cheap in ("sparse", "lowrank"):
        row(f"H=1024 x3 {cheap} B=1", lambda: big_b1(cheap))
    row("graph calls, native / Python", graph_calls)
    for cheap in ("sparse", "lowrank"):
        row(f"H=192 x2 {cheap} B=1", lambda: small(cheap))
    for cheap in ("sparse", "lowrank"):
        row(f"H=1024 x3 {cheap} B=64", lambda: mixed(cheap))
    for cheap in ("sparse", "lowrank"):
        row(f"H=1024 x3 {cheap} B=1 profile", lambda: where(cheap))
    # the stage's time limit cut the lease of 2026-12-04 (run4) in the low-rank B=1 tuning row: it goes last
    row("H=1024 x3 sparse B=1 tuning", lambda: tuning("sparse"))
    row(f"H=1024 x3 sparse B={MIXED_BATCH} tuning", mixed_tuning)
    row("H=1024 x3 lowrank B=1 tuning", lambda: tuning("lowrank"))


if __name__ == "__main__":
    main()
