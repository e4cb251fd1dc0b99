"""The AmNets model package `amnets`: latency simulator, switching encoder, RNN-T model."""

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
    ([0.1], -1.0, 0.0, "frame_period"), ([0.1], 1.0, -1.0, "final_cost"), (["x"], 1.0, 0.0, "frame_costs")])
def test_latency_rejects_bad_input(costs, period, final, match):
    with pytest.raises(ValueError, match=match):
        simulate_latency(costs, period, final_cost=final)
