"""benchmarks/amnets_encoder.py: its baselines compute what the AmNets encoder computes, and the quick grid
runs every candidate (a benchmark of wrong math, or one that crashes, would report nothing useful)."""

import pytest
import torch

from amnets.encoder import AmNetsEncoder
from benchmarks import amnets_encoder
from benchmarks.harness import measure


@pytest.mark.parametrize("cheap", ["sparse", "lowrank"])
def test_baselines_match_the_encoder(cheap):
    torch.manual_seed(0)
    enc = AmNetsEncoder(12, 32, 2, cheap=cheap, sparsity=0.5, block_size=16, rank=4).eval()
    x = torch.randn(5, 4, 12)
    full = torch.tensor([True, False, True, False, False])
    want = enc.stream(x, force=full)[0][:, -1]
    got = amnets_encoder.flop_only_stream(enc, amnets_encoder.dense_equivalent(enc), x, full)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        dense = amnets_encoder.dense_lstm(enc)(x)[0]
    torch.testing.assert_close(dense, enc.stream(x, force="full")[0], rtol=1e-4, atol=1e-5)


def test_quick_grid_times_every_candidate():
    cases = list(amnets_encoder.cases(torch.device("cpu"), quick=True))
    assert {c.params["cheap"] for c in cases} == {"sparse", "lowrank"}
    assert {(c.params["batch"], c.params["full_fraction"]) for c in cases} == {(1, 0.0), (1, 1.0), (8, 0.5)}
    rows = measure(cases[-1], torch.device("cpu"), rounds=1, round_s=0.0, budget_s=0.0)
    assert len(rows) >= 3 and all(r.median_ms is not None and r.median_ms > 0 for r in rows), rows
    labels = {r.label for r in rows}
    assert {"nn.LSTM (dense)", "dense-equivalent cheap branch (FLOP-only)", "amnets[cpu]"} <= labels


def test_headline_picks_the_issue_shape():
    full = dict(hidden=1024, layers=3, batch=64, full_fraction=0.5)
    assert amnets_encoder.headline(full, "fwd")
    assert not amnets_encoder.headline(dict(full, full_fraction=0.25), "fwd")
    assert not amnets_encoder.headline(dict(full, hidden=64), "fwd")
