"""python -m benchmarks.serving [--against DIR]: live streams served from Python threads, one stream per thread.

A server that holds many live streams (one per user) runs each on its own Python thread, with
torch.set_num_threads(1) so the streams, not the ops, share the cores. That only scales if the native call
of a frame releases the GIL, as torch's own ops do.

Rows (microseconds of wall time per frame, over all streams: lower is better; each the median of 7 timed
runs of ~0.2 s, the two rows of a path taking turns): the same frames, N streams (N = the cores the OS reports,
at most 4), each one frame per call,
  - "1 thread": one thread running the N streams in turn, frame by frame;
  - "N threads": N threads, each running its own stream, started together.
N threads / 1 thread is 1/N when the streams run in parallel, and ~1 when every frame holds the GIL.
Models: issue 12's H=192 x2 encoder (D=240; sparse 0.8 b=32, low-rank r=48), all-cheap frames
(threshold 1: the arbitrator runs and decides cheap) through AmNetsEncoder.streamer() and through
AmNetsEncoder.stream() with the state passed; stock nn.LSTM (H=192 x2) stepped one frame per call beside them.
Public entry points only, so `--against DIR` runs the same rows in an older checkout (benchmarks/ab.py).
SERVING_PATHS=streamer leaves out the stream() rows: builds before d5a08cd deadlock there (threads calling
stream() on one encoder).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wall_per_frame_us(steps: list, rounds: int = 7, seconds: float = 0.2) -> tuple[float, float]:
    """steps: one frame of each stream (callables). (1 thread, N threads): the medians over `rounds` of wall time
    / frames, the two taking turns in every round (so that the VM's drift hits both alike)."""
    for step in steps:  # warm-up
        for _ in range(20):
            step()
    frames = max(1, int(seconds / _one_frame_s(steps[0])))

    def one_thread():
        for _ in range(frames):
            for step in steps:
                step()

    def threads():
        start = threading.Barrier(len(steps) + 1)

        def work(step):
            start.wait()
            for _ in range(frames):
                step()

        pool = [threading.Thread(target=work, args=(s,)) for s in steps]
        for t in pool:
            t.start()
        start.wait()
        for t in pool:
            t.join()

    times = {one_thread: [], threads: []}
    for r in range(rounds):
        for run in ((one_thread, threads) if r % 2 == 0 else (threads, one_thread)):
            begin = time.perf_counter()
            run()
            times[run].append((time.perf_counter() - begin) / (frames * len(steps)) * 1e6)
    return statistics.median(times[one_thread]), statistics.median(times[threads])


def _one_frame_s(step) -> float:
    begin = time.perf_counter()
    for _ in range(50):
        step()
    return (time.perf_counter() - begin) / 50


def measure() -> dict:
    import torch

    from amnets.encoder import AmNetsEncoder

    torch.set_num_threads(1)
    n = max(2, min(4, os.cpu_count() or 2))
    rows = {}
    with torch.no_grad():
        for cheap in ("sparse", "lowrank"):
            torch.manual_seed(0)
            enc = AmNetsEncoder(240, 192, num_layers=2, cheap=cheap, sparsity=0.8, block_size=32,
                                rank=48).eval()
            frame = torch.randn(1, 1, 240)
            streamers = [enc.streamer(threshold=1.0) for _ in range(n)]
            states = [[(torch.zeros(2, 1, 192), torch.zeros(2, 1, 192))] for _ in range(n)]

            def stream_step(state):
                def step():
                    _, state[0], _ = enc.stream(frame, state[0], None, 1.0)
                return step

            paths = {"streamer()": [lambda s=s: s(frame) for s in streamers],
                     "stream()": [stream_step(state) for state in states]}
            if os.environ.get("SERVING_PATHS") == "streamer":
                del paths["stream()"]
            for how, steps in paths.items():
                label = f"AmNets H=192 x2 {cheap} all-cheap, {n} streams, {how}: "
                rows[label + "1 thread"], rows[label + f"{n} threads"] = wall_per_frame_us(steps)
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(240, 192, 2, batch_first=True).eval()
        frame = torch.randn(1, 1, 240)
        lstm_states = [[None] for _ in range(n)]

        def lstm_step(state):
            def step():
                _, state[0] = lstm(frame, state[0])
            return step

        label = f"stock nn.LSTM H=192 x2 stepped, {n} streams: "
        rows[label + "1 thread"], rows[label + f"{n} threads"] = wall_per_frame_us([lstm_step(s) for s in lstm_states])
    return rows


if __name__ == "__main__":  # an A/B run's measuring processes load measure() from this file (benchmarks/ab.py)
    sys.path.append(HERE)
    from benchmarks import ab

    ab.main(__doc__, __file__, measure)
