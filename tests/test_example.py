"""examples/swap_rnnt.py runs end to end with its defaults: it trains, swaps the kernels in where they pay,
fine-tunes, and keeps the dense model's accuracy (its speed-up is measured and printed: a figure for the
log, benchmarks/results/amd-epyc-swap-rnnt.log, not for a test)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))

import swap_rnnt  # noqa: E402


def test_swap_example_defaults_keep_accuracy(capsys):
    result = swap_rnnt.main([])
    assert result["before"]["loss"] < result["first_loss"] and result["before"]["accuracy"] > 0.5  # dense learned
    kinds = {r["name"]: r["to"] for r in result["report"].replaced}
    assert kinds == {"encoder": "LowRankLSTM", "predictor": "LowRankLSTM", "enc_proj": "BlockSparseLinear",
                     "loss": "RNNTLoss"}
    assert [s["name"] for s in result["report"].skipped] == ["out"]  # the vocabulary layer, below min_macs
    assert result["accuracy_kept"], result
    assert "speed-up" in capsys.readouterr().out
