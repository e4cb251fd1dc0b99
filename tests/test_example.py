"""examples/swap_rnnt.py runs end to end with its defaults: it trains, swaps the kernels in where they pay,
fine-tunes, and keeps the dense model's accuracy (its speed-up is measured and printed: a figure for the
log, benchmarks/results/amd-epyc-swap-rnnt.log, not for a test)."""

import pathlib
import sys

import pytest
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))

import swap_rnnt  # noqa: E402
import swap_torchaudio  # noqa: E402


def test_swap_example_defaults_keep_accuracy(capsys):
    result = swap_rnnt.main([])
    assert result["before"]["loss"] < result["first_loss"] and result["before"]["accuracy"] > 0.5  # dense learned
    kinds = {r["name"]: r["to"] for r in result["report"].replaced}
    assert kinds == {"encoder": "LowRankLSTM", "predictor": "LowRankLSTM", "enc_proj": "BlockSparseLinear",
                     "loss": "RNNTLoss"}
    assert [s["name"] for s in result["report"].skipped] == ["out"]  # the vocabulary layer, below min_macs
    assert result["accuracy_kept"], result
    assert result["success"] == (result["speedup"] > 1)  # the speed-up is the log's figure, not the test's
    assert swap_rnnt.verdict(True, result["speedup"], 0.05) in capsys.readouterr().out


TINY = ["--hidden", "8", "--feat-dim", "4", "--vocab", "3", "--batch", "2", "--steps", "1", "--finetune", "0",
        "--frames", "4", "--block-size", "4", "--min-macs", "0", "--rank", "2"]


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--threads", "0"), ("--vocab", "1"), ("--frames", "0"),
                                         ("--finetune", "-1"), ("--rank", "0"), ("--sparsity", "1.5")])
def test_swap_example_bad_flags_are_one_line_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as done:
        swap_rnnt.main(TINY + [flag, value])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: argument {flag}: " in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("accuracy, ms, want", [
    ((0.9, 0.9, 0.9), (1.0, 1.0, 2.0), "accuracy kept within 0.05 of the dense model's, but slower than dense (0.50x)"),
    ((0.9, 0.9, 0.9), (2.0, 1.0, 1.0), "accuracy kept within 0.05 of the dense model's at a 2.00x speed-up: success"),
    ((0.9, 0.5, 0.5), (2.0, 1.0, 1.0), "accuracy NOT kept within 0.05 of the dense model's, though at a 2.00x speed-up"),
    ((0.9, 0.5, 0.5), (1.0, 1.0, 2.0), "accuracy NOT kept within 0.05 of the dense model's, and slower than dense"),
])
def test_swap_example_verdict_states_accuracy_and_speed_as_measured(monkeypatch, capsys, accuracy, ms, want):
    """Success is accuracy kept AT a speed-up: a swapped model that measured slower must not read as a success."""
    accuracies, times = iter(accuracy), iter(ms)
    monkeypatch.setattr(swap_rnnt, "accuracy", lambda *a, **kw: next(accuracies))
    monkeypatch.setattr(swap_rnnt, "inference_ms", lambda *a, **kw: next(times))
    result = swap_rnnt.main(TINY + ["--threads", str(swap_rnnt.torch.get_num_threads())])
    assert want in capsys.readouterr().out.splitlines()[-1]
    assert result["success"] == ("success" in want)


def test_swap_torchaudio_refused_argument_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(swap_torchaudio.MODELS, "deepspeech", lambda: nn.LSTM(4, 4))  # small: the error is the point
    with pytest.raises(SystemExit) as done:
        swap_torchaudio.main(["deepspeech", "--linear-sparsity", "2"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(": error: swap_in: linear_sparsity must be a float in [0, 1]; got 2.0"), err
