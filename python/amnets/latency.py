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

import torch


def _check_simulate_latency(frame_costs, frame_period, final_cost) -> list[float]:
    if isinstance(frame_costs, (str, bytes)):  # iterable, but of characters
        raise ValueError(f"simulate_latency: frame_costs must be a sequence of numbers; got {frame_costs!r}")
    if isinstance(frame_costs, torch.Tensor):
        frame_costs = frame_costs.detach().reshape(-1).tolist()
    try:
        costs = [float(c) for c in frame_costs]
    except (TypeError, ValueError):
        raise ValueError(f"simulate_latency: frame_costs must be a sequence of numbers; got {frame_costs!r}")
    if not costs:
        raise ValueError("simulate_latency: frame_costs must hold at least one frame; got none")
    bad = [c for c in costs if not math.isfinite(c) or c < 0]
    if bad:
        raise ValueError(f"simulate_latency: frame_costs must be finite and non-negative; got {bad[0]!r}")
    for name, value, positive in (("frame_period", frame_period, True), ("final_cost", final_cost, False)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            need = "a positive" if positive else "a non-negative"
            raise ValueError(f"simulate_latency: {name} must be {need} finite number (seconds); "
                             f"got {value!r}")
    return costs


def simulate_latency(frame_costs, frame_period: float, final_cost: float = 0.0) -> dict:
    """Simulate one stream; frame_costs are seconds of compute per frame (list, tuple or tensor).

    Returns dict(upl=..., rtf=..., max_backlog=...) in seconds (rtf unitless); see the module docstring.
    """
    costs = _check_simulate_latency(frame_costs, frame_period, final_cost)
    finish, max_backlog = 0.0, 0.0
    for i, cost in enumerate(costs):
        arrival = (i + 1) * frame_period
        start = max(arrival, finish)
        max_backlog = max(max_backlog, start - arrival)
        finish = start + cost
    last_arrival = len(costs) * frame_period
    return dict(upl=finish + final_cost - last_arrival,
                rtf=(sum(costs) + final_cost) / (len(costs) * frame_period),
                max_backlog=max_backlog)
