"""amnets eval: only eval's flags, --force honoured, the checkpoint's data by default, the files it writes."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import amnets.cli
from amnets.cli import build_parser, main
from test_amnets_cli import TINY_MODEL, corpus  # noqa: F401  (corpus: the module's fixture)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):  # noqa: F811
    ckpt = tmp_path_factory.mktemp("ck")
    assert main(["train", "--steps", "2", "--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL) == 0
    return str(ckpt / "last.pt")


def evaluate(capsys, *argv, err: list | None = None) -> dict:
    """amnets eval's summary (the json on stdout); err, if given, receives what it wrote to stderr."""
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    out = capsys.readouterr()
    if err is not None:
        err.append(out.err)
    return json.loads(out.out.strip().splitlines()[-1])


def test_eval_help_lists_eval_flags_only():
    sub = build_parser().commands
    flags = {s for a in sub["eval"]._actions for s in a.option_strings}
    assert {"--force", "--threshold", "--beam", "--max-symbols", "--data", "--split", "--out", "--config",
            "--debug"} <= flags
    assert not flags & {"--hidden-size", "--cheap", "--lr", "--steps", "--checkpoint-dir", "--tau0"}
    assert len(flags) < 16  # was ~35: every training flag
    eval_help = sub["eval"].format_help()
    assert "{none,full,cheap}" in eval_help and "--hidden-size" not in eval_help
    train_flags = {s for a in sub["train"]._actions for s in a.option_strings}
    assert {"--eval-data", "--eval-every", "--average-last", "--anneal-steps"} <= train_flags
    assert "--beam" not in train_flags and "--out" not in train_flags


def test_eval_force_is_honoured(checkpoint, capsys):
    free = evaluate(capsys, checkpoint)  # the checkpoint's own setting: the arbitrator decides
    assert free["force"] is None and 0 <= free["full_fraction"] < 1
    full = evaluate(capsys, checkpoint, "--force", "full")
    cheap = evaluate(capsys, checkpoint, "--force", "cheap")
    assert (full["full_fraction"], cheap["full_fraction"]) == (1.0, 0.0)
    assert cheap["macs_per_frame"] < free["macs_per_frame"] < full["macs_per_frame"]
    # none: the arbitrator decides again, at the given threshold (p_full > 0 always: every frame full)
    assert evaluate(capsys, checkpoint, "--force", "none", "--threshold", "0")["full_fraction"] == 1.0
    assert evaluate(capsys, checkpoint, "--force", "none", "--threshold", "1")["full_fraction"] == 0.0


def test_eval_takes_the_checkpoints_data_and_writes_hyps_refs_and_per_utterance_files(
        corpus, checkpoint, capsys, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # another working directory: the checkpoint's data path is absolute
    summary = evaluate(capsys, checkpoint, "--out", "out")
    assert summary["data"] == os.path.abspath(corpus) and summary["utterances"] == 8
    assert summary["beam"] == 1 and summary["step"] == 2
    files = sorted(os.listdir("out"))
    assert files == ["hyps.txt", "refs.txt", "summary.json", "utterances.jsonl"]
    assert json.loads(open("out/summary.json").read()) == summary
    with open(os.path.join(corpus, "transcripts.txt")) as f:
        transcripts = [line.split(" ", 1) for line in f.read().splitlines()]
    refs = [line.split(" ", 1) for line in open("out/refs.txt").read().splitlines()]
    assert refs == transcripts  # "<id> <text>" per line
    hyps = [line.split(" ", 1)[0] for line in open("out/hyps.txt").read().splitlines()]
    rows = [json.loads(line) for line in open("out/utterances.jsonl")]
    assert hyps == [r["id"] for r in rows] == [t[0] for t in transcripts]
    for r in rows:
        assert set(r) >= {"id", "ref", "hyp", "wer", "cer", "full_fraction", "macs_per_frame", "frames"}
        assert r["wer"] == r["word_errors"] / r["words"] and 0 <= r["full_fraction"] <= 1
    total = {k: sum(r[k] for r in rows) for k in ("word_errors", "words", "char_errors", "chars", "frames")}
    assert summary["wer"] == pytest.approx(total["word_errors"] / total["words"])
    assert summary["cer"] == pytest.approx(total["char_errors"] / total["chars"])
    macs = sum(r["macs_per_frame"] * r["frames"] for r in rows)
    assert summary["macs_per_frame"] == pytest.approx(macs / total["frames"])


def test_eval_beam_writes_beside_the_checkpoint_by_default(corpus, checkpoint, capsys):  # noqa: F811
    err = []
    summary = evaluate(capsys, checkpoint, "--beam", "3", "--data", corpus, err=err)
    out = os.path.join(os.path.dirname(checkpoint), f"eval_last_{os.path.basename(corpus)}_beam3")
    assert summary["beam"] == 3 and os.path.isfile(os.path.join(out, "hyps.txt"))
    assert f"wrote hyps.txt, refs.txt, utterances.jsonl, summary.json to {out}" in err[0]


def test_eval_config_file_takes_eval_keys_only(checkpoint, capsys, tmp_path):
    toml = tmp_path / "decode.toml"
    toml.write_text('beam = 2\nforce = "full"\n')
    summary = evaluate(capsys, checkpoint, "--config", str(toml), "--out", str(tmp_path / "ev"))
    assert (summary["beam"], summary["force"], summary["full_fraction"]) == (2, "full", 1.0)
    toml.write_text("hidden_size = 3\n")  # a model key: the checkpoint fixes it
    assert main(["eval", checkpoint, "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "['hidden_size'] are not eval keys but train and demo keys; eval takes the model" in err
    # the config.json train wrote beside the checkpoint: was "unknown keys", as if misspelt
    config_json = os.path.join(os.path.dirname(checkpoint), "config.json")
    assert main(["eval", checkpoint, "--config", config_json]) == 2
    err = capsys.readouterr().err
    assert "'weight_decay'] are not eval keys but train keys; eval takes the model and training" in err
    assert len(err.splitlines()) == 1
    toml.write_text("beem = 3\n")
    assert main(["eval", checkpoint, "--config", str(toml)]) == 2
    assert "unknown keys ['beem']; known: ['beam'," in capsys.readouterr().err


def test_eval_names_where_a_missing_data_directory_came_from(checkpoint, capsys, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=False)
    gone = str(tmp_path / "gone")
    ckpt["config"]["data"] = gone  # the corpus it was trained on, since deleted
    torch.save(ckpt, tmp_path / "moved.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "moved.pt")]) == 2
    err = capsys.readouterr().err  # was "--data: no such directory", though no --data was given
    assert err == (f"amnets eval: error: the checkpoint's --data (recorded in {tmp_path / 'moved.pt'}): "
                   f"no such directory: {gone}; give --data\n")


def test_eval_checks_out_before_decoding(corpus, checkpoint, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(amnets.cli, "decode_utterances", lambda *a, **k: pytest.fail("decoded first"))
    out = os.path.join(corpus, "transcripts.txt", "out")  # under a file: cannot be made
    assert main(["eval", checkpoint, "--out", out]) == 2
    assert f"--out: cannot write to {out} ({os.path.dirname(out)} is not a directory)" in capsys.readouterr().err


def test_eval_makes_its_output_directory_only_once_the_data_has_decoded(corpus, checkpoint, capsys, tmp_path):
    # A bad audio file was named clearly, but the output directory (by default beside the checkpoint) was made.
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    first = sorted(p for p in os.listdir(bad) if p.endswith(".wav"))[0]
    sf.write(bad / first, np.zeros(100, np.float32), 16000)
    out = tmp_path / "out"
    assert main(["eval", checkpoint, "--data", str(bad), "--out", str(out)]) == 2
    assert "the waveform must hold at least 201 samples" in capsys.readouterr().err and not out.exists()
