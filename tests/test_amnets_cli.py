"""amnets.cli: metrics, configuration, data-parallel training with checkpoints and resume, eval, the demo.

The fixtures and helpers here (corpus, TINY_MODEL, run) are shared with tests/test_amnets_cli_*.py."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from amnets.cli import (CONFIG, build_parser, check_config, defaults, edit_distance, error_rate, main,
                        resolve_config, temperature)
from amnets.data import make_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]), OMP_NUM_THREADS="1")
TINY_MODEL = ["--hidden-size", "32", "--num-layers", "1", "--block-size", "16", "--pred-hidden", "16",
              "--joint-hidden", "16", "--arbitrator-hidden", "8", "--batch-size", "2", "--threads", "1",
              "--progress", "false", "--log-every", "1"]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (make install installs it)")


@pytest.mark.parametrize("ref, hyp, want", [("", "", 0), ("abc", "", 3), ("", "ab", 2),
                                            ("kitten", "sitting", 3), ("abc", "abc", 0), ("abcd", "acbd", 2)])
def test_edit_distance(ref, hyp, want):
    assert edit_distance(ref, hyp) == want == edit_distance(hyp, ref)


def test_wer_and_cer():
    refs, hyps = ["the cat sat", "go home"], ["the bat sat down", "go home"]
    assert error_rate(refs, hyps, "word") == pytest.approx(2 / 5)  # one substitution, one insertion
    assert error_rate(refs, hyps, "char") == pytest.approx(6 / 18)  # c->b, then " down"
    with pytest.raises(ValueError, match="unit must be 'word' or 'char'; got 'words'"):  # was a CER
        error_rate(refs, hyps, "words")
    with pytest.raises(ValueError, match="references"):
        error_rate(["a"], [], "word")
    with pytest.raises(ValueError, match="empty"):
        error_rate([""], ["a"], "word")


def test_temperature_anneals_exponentially_from_tau0_to_tau_min():
    cfg = dict(defaults(), tau0=2.0, tau_min=0.5, steps=5)
    taus = [temperature(cfg, s) for s in range(5)]
    assert taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.5)
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert ratios == pytest.approx([0.5 ** 0.5] * 4)  # a constant factor per step


def test_config_file_then_flags_override_the_defaults(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('hidden_size = 64\ncheap = "lowrank"\nbudget = 0.3\n')
    args = build_parser().parse_args(["train", "--config", str(toml), "--hidden-size", "48", "--force",
                                      "full"])
    seen, given = resolve_config("train", args)
    assert (seen["hidden_size"], seen["cheap"], seen["budget"], seen["force"]) == (48, "lowrank", 0.3, "full")
    assert seen["num_layers"] == CONFIG["num_layers"][0]
    assert given == {"hidden_size", "cheap", "budget", "force"}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"hidden_sise": 3}))
    assert main(["train", "--config", str(js)]) == 2
    assert "unknown keys ['hidden_sise']" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", 0, "hidden_size"), ("lr", 0.0, "lr"), ("cheap", 3, "cheap"), ("cheap", "pruned", "cheap"),
    ("force", "dense", "force"), ("budget", 1.5, "budget"), ("save_every_rank", 1, "save_every_rank"),
    ("cost_weight", -1.0, "cost_weight"), ("hidden_size", 16.0, "hidden_size must be an integer; got 16.0"),
    ("lr", "big", "lr must be a number"),
    # nan and inf: only < 0 was checked, and a nan passes that; training then "diverged"
    ("cost_weight", math.nan, "cost_weight must be a finite number >= 0; got nan"),
    ("cost_weight", math.inf, "cost_weight must be a finite"), ("grad_clip", math.nan, "grad_clip"),
    ("weight_decay", math.inf, "weight_decay"), ("budget", math.nan, "budget"),
    ("threshold", math.nan, "threshold"),
    ("sparsity", math.nan, r"sparsity must be in \[0, 1\)"), ("init_p_full", math.inf, "init_p_full")])
def test_check_config_names_the_bad_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        check_config(dict(defaults(), **{key: value}))


def test_a_config_file_says_none_as_the_flags_do(tmp_path):
    # TOML has no null: "none" (what --force none and --budget none take) was refused as a value
    toml = tmp_path / "c.toml"
    toml.write_text('force = "none"\nbudget = "None"\n')
    args = build_parser().parse_args(["train", "--config", str(toml)])
    seen, _ = resolve_config("train", args, dict(defaults(), force="full", budget=0.5))
    assert (seen["force"], seen["budget"]) == (None, None)


def test_unknown_cheap_kind_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data", str(tmp_path), "--cheap", "pruned"] + TINY_MODEL)
    assert stop.value.code == 2
    assert "argument --cheap: expected one of {sparse,lowrank}; got 'pruned'" in capsys.readouterr().err
    toml = tmp_path / "c.toml"
    toml.write_text('cheap = "pruned"\n')  # a --config file's value is checked as well
    assert main(["train", "--data", str(tmp_path), "--config", str(toml)]) == 2
    assert "cheap must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--save-every-rank", "maybe"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install installs it)")
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), 8, seed=3)


def run(args, timeout=120, cwd=ROOT):
    done = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_ddp_training_agrees_checkpoints_resumes_and_evaluates(corpus, tmp_path):
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "amnets", "train",
         "--steps", "3", "--save-every-rank", "true"] + common)
    ranks = [torch.load(ckpt / f"last.rank{r}.pt", weights_only=False) for r in (0, 1)]
    last = torch.load(ckpt / "last.pt", weights_only=False)
    assert last["step"] == ranks[0]["step"] == ranks[1]["step"] == 3
    for name, value in last["model"].items():  # DDP kept the ranks identical
        assert torch.equal(value, ranks[1]["model"][name]), name
        assert torch.equal(value, ranks[0]["model"][name]), name
    assert last["config"]["hidden_size"] == 32 and last["optimizer"]["state"]

    done = run(["-m", "amnets", "train", "--resume", str(ckpt / "last.pt"), "--steps", "5"] + common)
    logged = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("step ")]
    assert logged == ["4", "5"]  # continued from step 3, did not start over
    assert "was trained on 2 process(es), this run on 1" in done.stderr  # said, not silent
    assert "last.rank<r>.pt of ranks past this run's are the earlier run's" in done.stderr
    resumed = torch.load(ckpt / "last.pt", weights_only=False)
    assert resumed["step"] == 5
    assert all(s["step"] == 5 for s in resumed["optimizer"]["state"].values())  # AdamW's count carried on
    assert not torch.equal(resumed["model"]["encoder.weight_ih_l0"], last["model"]["encoder.weight_ih_l0"])

    result = json.loads(run(["-m", "amnets", "eval", str(ckpt / "last.pt"), "--data", corpus]).stdout)
    assert result["utterances"] == 8 and result["wer"] >= 0 and result["cer"] >= 0
    assert 0 <= result["full_fraction"] <= 1 and result["macs_per_frame"] > 0


@needs_espeak
def test_tiny_demo_end_to_end(tmp_path):
    started = time.time()
    done = run(["-m", "amnets", "demo", "--tiny", "--out", str(tmp_path)])
    assert time.time() - started < 40  # 7 s on the 2-core machine; the target is 20 s
    assert f"amnets demo: writing to {tmp_path}" in done.stderr  # says where it writes
    table = done.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("model"))
    rows = [line.split() for line in table[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["dense", "amnets", "amnets"]
    assert [r[1] for r in rows[1:]] == ["sparse", "lowrank"]
    # steps WER CER frac MACs ms x-dense UPL
    dense, sparse, lowrank = ([float(v) for v in r[-8:]] for r in rows)
    assert dense[0] == 24 and sparse[0] == lowrank[0] == 16  # tiny: 16 steps, the dense model 1.5x
    assert all(r[1] <= 1 and r[2] <= 1 for r in (dense, sparse, lowrank))  # WER, CER: no garbage emitted
    assert dense[3] == 1.0 and sparse[3] < 1.0 and lowrank[3] < 1.0  # the arbitrators chose some cheap frames
    assert sparse[4] < dense[4] and lowrank[4] < dense[4]  # fewer MACs per frame than the dense model
    assert all(r[5] > 0 and r[7] >= 0 for r in (dense, sparse, lowrank))
    assert dense[6] == 1.0 and abs(sparse[6] - sparse[5] / dense[5]) < 0.01 + 0.002 / dense[5]  # printed rounded
    assert os.path.isfile(tmp_path / "dense" / "last.pt")
    assert os.path.isfile(tmp_path / "corpus" / "transcripts.txt")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["dense", "amnets sparse", "amnets lowrank"]
    assert [m["steps"] for m in results["models"]] == [24, 16, 16] and results["eval_utterances"] == 4
    assert all(m["cer"] <= 1 and m["frame_ms"] > 0 for m in results["models"])
    assert (tmp_path / "table.txt").read_text().splitlines()[:4] == table[header:header + 4]


@needs_espeak
def test_tiny_demo_default_output_is_a_temporary_directory_it_names(tmp_path):
    done = run(["-m", "amnets", "demo", "--tiny", "--utterances", "10", "--steps", "1"], cwd=tmp_path)
    assert os.listdir(tmp_path) == []  # nothing left in the working directory
    out = next(line for line in done.stderr.splitlines() if line.startswith("amnets demo: writing to "))
    out = out[len("amnets demo: writing to "):].split(" (")[0]
    assert out.startswith(tempfile.gettempdir()) and os.path.isfile(os.path.join(out, "results.json"))
    shutil.rmtree(out)


def test_batches_cover_the_data_once_per_epoch_sorted_in_windows():
    from amnets.cli import BUCKET, batches

    lengths = [float((i * 37) % 101) for i in range(100)]  # scrambled lengths
    cfg = dict(defaults(), batch_size=4, seed=1)
    shares = [batches(lengths, cfg, epoch=2, rank=r, world=2) for r in (0, 1)]
    assert sorted(i for share in shares for b in share for i in b) == list(range(100))
    assert len(shares[0]) == len(shares[1]) == 13  # 50 each: 12 full batches and one of 2
    window = BUCKET * 4
    for share in shares:
        # within a batch lengths are contiguous in a sorted window: narrower than a random draw
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in share) / len(share)
        assert spread < 100 / window * 4 * 2
    assert batches(lengths, cfg, 2, 0, 2) == shares[0] != batches(lengths, cfg, 3, 0, 2)


def test_train_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"] + TINY_MODEL
    assert main(["train", "--steps", "2"] + common) == 0
    capsys.readouterr()
    # lr 1e30 (the resumed run's own lr, not the checkpoint's): a step blows the weights up to ~1e30, still
    # finite; the next step's gradient is NaN. The checkpoint of the blown-up weights must not replace step 2's.
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "12", "--lr", "1e30"] + common) == 1
    err = capsys.readouterr().err
    assert "became non-finite" in err and "last good checkpoint is kept" in err and "Lower --lr" in err
    last = torch.load(ckpt / "last.pt", weights_only=False)
    assert last["step"] == 2
    assert all(v.abs().max() < 100 for v in last["model"].values() if v.is_floating_point())
    assert sorted(p for p in os.listdir(ckpt) if ".pt" in p) == ["last.pt"]  # no pending checkpoint left
    assert main(["train", "--lr", "inf"] + common) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_eval_refuses_model_flags_the_checkpoint_fixes(corpus, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    assert main(["train", "--steps", "1", "--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(ckpt / "last.pt"), "--hidden-size", "999", "--cheap", "lowrank"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "unrecognized arguments: --hidden-size 999 --cheap lowrank" in err and "from the checkpoint" in err


@needs_espeak
def test_demo_reuses_its_corpus_only_when_made_with_the_same_parameters(tmp_path, capsys):
    # An old corpus was reused whatever --utterances and --seed said (results.json recorded the new seed).
    from amnets.cli import UsageError, _demo_corpus

    corpus = str(tmp_path / "corpus")
    first = _demo_corpus(corpus, 3, 0)
    assert len(first) == 3 and capsys.readouterr().err == ""
    assert _demo_corpus(corpus, 3, 0) == first
    assert capsys.readouterr().err == (f"amnets demo: reusing the corpus in {corpus} (made with the same "
                                       "--utterances 3 and --seed 0)\n")
    assert len(_demo_corpus(corpus, 2, 1)) == 2
    assert capsys.readouterr().err == (f"amnets demo: the corpus in {corpus} was made with --utterances 3 "
                                       "--seed 0; remaking it with --utterances 2 --seed 1\n")
    assert sorted(os.listdir(corpus)) == ["demo_corpus.json", "transcripts.txt", "utt000000.wav",
                                          "utt000001.wav"]
    assert [t for _, t in _demo_corpus(corpus, 2, 1)] != [t for _, t in first[:2]]  # seed 1's sentences
    mine = str(tmp_path / "mine")  # a corpus the demo did not record making is not replaced
    make_corpus(mine, 1)
    with pytest.raises(UsageError, match=f"^{mine} is not a corpus this demo recorded making"):
        _demo_corpus(mine, 1, 0)


def test_demo_has_no_cheap_flag(capsys):
    # --cheap was listed in the demo's --help, but every demo model sets its own.
    flags = {s for a in build_parser().commands["demo"]._actions for s in a.option_strings}
    assert "--cheap" not in flags and {"--hidden-size", "--force", "--sparsity", "--rank"} <= flags
    with pytest.raises(SystemExit):
        main(["demo", "--tiny", "--cheap", "sparse"])
    assert "unrecognized arguments: --cheap sparse" in capsys.readouterr().err
