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
