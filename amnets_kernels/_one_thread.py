"""OneThread: a live stream's state is one, so one thread at a time may be inside a stream's methods.

The CPU engine's stream enforces this in C++ (csrc/cpu/frame_engine.cpp: InUse), since its chunk runs with the
GIL released; the Python streams (the Triton engine's, and AmNetsEncoder.streamer off the engines) use this, with
the same message. A second thread gets an error at once instead of waiting: waiting would run the two threads'
chunks one after the other on one state, which is never what either meant.
"""

from __future__ import annotations

import threading


class OneThread:
    """`with self._one_thread: ...` around every method that reads or writes a stream's state."""

    def __init__(self, owner: str):
        self._lock, self._owner = threading.Lock(), owner

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self._owner}: this stream is in use by another thread; give each thread its own "
                               "stream (Streamer.fork() copies one)")

    def __exit__(self, *exc) -> None:
        self._lock.release()
