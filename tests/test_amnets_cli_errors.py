"""User errors: one line on stderr, `amnets <command>: error: ...`, a non-zero exit; the traceback only with
--debug."""

import subprocess
import sys

import pytest

from amnets.cli import UsageError, main
from test_amnets_cli import ENV, ROOT, TINY_MODEL, corpus  # noqa: F401  (corpus: the module's fixture)


def fails(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of main(argv), whether it returned or argparse exited."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "missing.pt"], "amnets eval: error: checkpoint not found: missing.pt"),
    (["eval", "{tmp}"], "amnets eval: error: {tmp} is a directory; give a checkpoint in it, e.g. {tmp}/last.pt or "
                        "{tmp}/best.pt"),
    (["eval", "{corpus}/transcripts.txt"], "is not a checkpoint torch.load can read"),
    (["eval", "{ckpt}", "--beam", "0"], "amnets eval: error: config: beam must be >= 1; got 0"),
    (["eval", "{ckpt}", "--beam", "two"], "amnets eval: error: argument --beam: invalid int value: 'two'"),
    (["eval", "{ckpt}", "--force", "dense"], "--force: expected one of {none,full,cheap}; got 'dense'"),
    (["eval", "{ckpt}", "--data", "{corpus}/nowhere"], "amnets eval: error: --data: no such directory"),
    (["eval", "{ckpt}", "--lr", "1"], "amnets eval: error: unrecognized arguments: --lr 1; eval takes"),
    (["train"], "amnets train: error: --data is required"),
    (["train", "--data", "{corpus}", "--eval-data", "nowhere"], "error: --eval-data: no such directory"),
    (["train", "--data", "{corpus}", "--budget", "2"], "error: config: budget must be none or in [0, 1]"),
    (["train", "--config", "missing.toml"], "amnets train: error: config file not found: missing.toml"),
    (["train", "--resume", "missing.pt"], "amnets train: error: checkpoint not found: missing.pt"),
    (["demo", "--tiny", "--utterances", "2", "--out", "{tmp}"], "error: --utterances must be at least 3"),
    # refused before the corpus and three models are made, not when the streaming is timed
    (["demo", "--tiny", "--stream-threads", "0", "--out", "{tmp}"], "--stream-threads must be >= 1; got 0"),
    # non-finite values used to pass (only < 0 was checked) and the run stopped as if diverged
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--cost-weight", "nan"],
     "config: cost_weight must be a finite number >= 0; got nan"),
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--grad-clip", "nan"],
     "config: grad_clip must be a finite number >= 0; got nan"),
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--weight-decay", "inf"],
     "config: weight_decay must be a finite number >= 0; got inf"),
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--sparsity", "nan"],
     "config: sparsity must be in [0, 1); got nan"),
    # the checkpoint's model (shapes, mask) cannot change under --resume: was a load_state_dict traceback
    (["train", "--resume", "{ckpt}", "--hidden-size", "48", "--cheap", "lowrank"],
     "the checkpoint's model fixes --hidden-size (the checkpoint: 32; given: 48), --cheap (the checkpoint: "
     "'sparse'; given: 'lowrank'); drop them"),
    (["corpus", "{corpus}"], "amnets corpus: error: {corpus} already holds a corpus"),
    (["corpus", "{tmp}/c", "--rate", "300", "100"], "amnets corpus: error: --rate: MIN MAX words per minute"),
    (["frobnicate"], "amnets: error: argument {corpus,train,eval,demo}: invalid choice: 'frobnicate'"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, corpus, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ck"
    if "{ckpt}" in argv:
        assert main(["train", "--steps", "1", "--data", corpus, "--checkpoint-dir", str(ckpt)]
                    + TINY_MODEL) == 0
    fill = {"{corpus}": corpus, "{ckpt}": str(ckpt / "last.pt"), "{tmp}": str(tmp_path)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        message = message.replace(key, value)
    code, err = fails(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_debug_shows_the_traceback(capsys):
    for argv in (["--debug", "eval", "missing.pt"], ["eval", "missing.pt", "--debug"]):
        with pytest.raises(UsageError, match="checkpoint not found: missing.pt"):
            main(argv)


def test_the_installed_command_prints_no_traceback():
    done = subprocess.run([sys.executable, "-m", "amnets", "eval", "missing.pt"], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "amnets eval: error: checkpoint not found: missing.pt\n"



def write_corpus(directory, samples: list[int]) -> list:
    """A corpus directory by hand (no espeak-ng): silent 16 kHz WAVs of the given lengths."""
    import numpy as np
    import soundfile as sf

    directory.mkdir()
    paths = [directory / f"utt{i:06d}.wav" for i in range(len(samples))]
    for path, n in zip(paths, samples):
        sf.write(path, np.zeros(n, dtype="float32"), 16000)
    (directory / "transcripts.txt").write_text("".join(f"{p.stem} one two\n" for p in paths))
    return paths


@pytest.mark.parametrize("audio, message", [
    ("short", "{path}: LogMel: the waveform must hold at least 201 samples (12.6 ms at 16 kHz); got 150"),
    ("text", "cannot read audio: Error opening '{path}': Format not recognised"),
])
def test_a_short_or_unreadable_audio_file_is_named_before_training(audio, message, tmp_path, capsys):
    # Was a RuntimeError from LogMel's padding, or soundfile's own traceback, out of the first epoch.
    good = write_corpus(tmp_path / "good", [3200])
    bad = write_corpus(tmp_path / "bad", [3200, 150])[1]
    if audio == "text":
        bad.write_text("not audio\n")
    for data in (["--data", str(bad.parent)],
                 ["--data", str(good[0].parent), "--eval-data", str(bad.parent)]):
        code, err = fails(["train", *data, "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck")]
                          + TINY_MODEL, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert message.replace("{path}", str(bad)) in err, err
        assert not (tmp_path / "ck").exists()  # refused before anything was trained or written
