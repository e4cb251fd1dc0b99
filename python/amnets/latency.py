"""Streaming latency of a frame-synchronous encoder, from per-frame compute costs.

A single worker processes frames in order. Frame i (0-based) arrives when its audio is complete, at
arrival_i = (i + 1) * frame_period; it starts at start_i = max(arrival_i, finish_{i-1}) (finish_{-1} = 0)
and finishes at finish_i = start_i + frame_costs[i]. A cost paid once after the last frame (say, the
final decoder flush) is `final_cost`.

  upl          user-perceived latency: finish of the last frame (+ final_cost) - arrival of the last frame,
               i.e. how long after the speaker stops the result is complete.
  rtf          real-time factor: (sum(frame_costs) + final_cost) / (n * frame_period). Above 1 the
               backlog grows without bound.
  max_backlog  the longest any frame waited for the worker: max_i (start_i - arrival_i).
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence

import numpy as np
import torch


def _is_real(value) -> bool:
    """A real number of any kind (Python, NumPy), not a bool: True is no cost in seconds."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _finite_seconds(value) -> bool:
    """A real number that is finite and >= 0 as a float (an int past float's range, 10**400, is not)."""
    try:
        return _is_real(value) and math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


def _check_simulate_latency(frame_costs, frame_period, final_cost) -> tuple[list[float], float, float]:
    op = "simulate_latency"
    if isinstance(frame_costs, (str, bytes)):  # iterable, but of characters
        raise ValueError(f"{op}: frame_costs must be a sequence of numbers; got {frame_costs!r}")
    if isinstance(frame_costs, (torch.Tensor, np.ndarray)):  # one stream: a batch is one call per row
        if frame_costs.ndim != 1:
            raise ValueError(f"{op}: frame_costs must be 1-d (one stream's costs; call once per stream); got "
                             f"shape {tuple(frame_costs.shape)}")
        frame_costs = frame_costs.tolist()  # Python numbers (a tensor's bools stay bools: refused below)
    # An ordered sequence: a set (or a dict, a generator) has no frame order, and a set merges equal costs.
    if not isinstance(frame_costs, Sequence):
        raise ValueError(f"{op}: frame_costs must be a sequence of numbers (a list, a tuple, a 1-d tensor or "
                         f"array); got a {type(frame_costs).__name__}")
    costs = list(frame_costs)
    if not costs:
        raise ValueError(f"{op}: frame_costs must hold at least one frame; got none")
    bad = [c for c in costs if not _finite_seconds(c)]
    if bad:
        raise ValueError(f"{op}: frame_costs must be finite non-negative real numbers (seconds), or a 1-d "
                         f"tensor or array of them; got {reprlib.repr(bad[0])}")  # (a 400-digit int abbreviated)
    for name, value, positive in (("frame_period", frame_period, True), ("final_cost", final_cost, False)):
        if not _finite_seconds(value) or (positive and value == 0):
            need = "a positive" if positive else "a non-negative"
            raise ValueError(f"{op}: {name} must be {need} finite number (seconds); got {reprlib.repr(value)}")
    return [float(c) for c in costs], float(frame_period), float(final_cost)


def simulate_latency(frame_costs, frame_period: float, final_cost: float = 0.0) -> dict:
    """Simulate one stream; frame_costs are seconds of compute per frame (a sequence of real numbers, or
    a 1-d tensor or array); frame_period and final_cost are real numbers (Python's or NumPy's), in seconds.

    Returns dict(upl=..., rtf=..., max_backlog=...) in seconds (rtf unitless); see the module docstring.
    """
    costs, frame_period, final_cost = _check_simulate_latency(frame_costs, frame_period, final_cost)
    finish, max_backlog = 0.0, 0.0
    for i, cost in enumerate(costs):
        arrival = (i + 1) * frame_period
        start = max(arrival, finish)
        max_backlog = max(max_backlog, start - arrival)
        finish = start + cost
    last_arrival = len(costs) * frame_period
    result = dict(upl=finish + final_cost - last_arrival, rtf=(sum(costs) + final_cost) / (len(costs) * frame_period),
                  max_backlog=max_backlog)
    if not all(math.isfinite(v) for v in result.values()):  # finite inputs whose sums or ratio overflow a float
        raise ValueError(f"simulate_latency: the inputs overflow a float (upl, rtf, max_backlog = "
                         f"{', '.join(f'{v:.3g}' for v in result.values())}); frame_costs and frame_period must "
                         "be seconds of a plausible size")
    return result
