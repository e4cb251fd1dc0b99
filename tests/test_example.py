"""examples/swap_rnnt.py runs end to end at a tiny size: it trains, swaps the kernels in, fine-tunes."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))

import swap_rnnt  # noqa: E402


def test_swap_example_runs_at_tiny_size(capsys):
    result = swap_rnnt.main(["--hidden", "32", "--layers", "1", "--vocab", "6", "--steps", "80", "--finetune", "10",
                             "--rank", "8", "--sparsity", "0.5", "--block-size", "8", "--frames", "20"])
    assert result["before"]["loss"] < result["first_loss"]  # the dense model learned something
    kinds = {r["to"] for r in result["report"].replaced}
    assert kinds == {"LowRankLSTM", "BlockSparseLinear", "RNNTLoss"}
    for stage in ("before", "swapped", "after"):
        assert result[stage]["ms"] > 0 and 0.0 <= result[stage]["accuracy"] <= 1.0
    assert "speed-up" in capsys.readouterr().out
