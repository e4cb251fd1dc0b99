"""amnets corpus: the espeak-ng corpus from the command line (amnets.data.make_corpus)."""

import json
import os
import shutil

import pytest

from amnets.cli import main
from amnets.data import corpus_items, make_corpus

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed "
                                "(the CI installs it: apt-get install espeak-ng)")


def test_corpus_command_makes_the_seeded_corpus_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["corpus", str(out), "-n", "3", "--seed", "7", "--words", "1", "2", "--jobs", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["utterances"] == 3 and summary["dir"] == str(out) and 3 <= summary["words"] <= 6
    assert summary["audio_s"] > 0
    # the same corpus as make_corpus with the same arguments, file for file
    ref = make_corpus(str(tmp_path / "ref"), 3, seed=7, words_per_utterance=(1, 2))
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    assert main(["corpus", str(out), "-n", "2"]) == 2
    assert "already holds a corpus (transcripts.txt); --overwrite replaces it" in capsys.readouterr().err
    assert main(["corpus", str(out), "-n", "2", "--seed", "8", "--voices", "en-us", "--overwrite"]) == 0
    assert len(corpus_items(str(out))) == 2
    assert sorted(os.listdir(out))[-1] == "utt000001.wav"  # the old third utterance's audio is gone


def test_corpus_command_names_a_bad_voice_before_writing_anything(tmp_path, capsys):
    # A bad voice after a good one was found at its first utterance: WAVs without transcripts.txt, which a
    # plain rerun then refused.
    assert main(["corpus", str(tmp_path / "c"), "-n", "3", "--seed", "5", "--voices", "en-us,xx-nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amnets corpus: error: make_corpus: espeak-ng -v xx-nope failed")
    assert len(err.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_corpus_command_removes_only_the_audio_it_wrote(tmp_path, capsys):
    # It removed every utt*.wav the new corpus did not list, even in a directory that held no corpus, and
    # without --overwrite: the user's own recordings went with them.
    out = tmp_path / "mine"
    out.mkdir()
    mine = {name: name.encode() for name in ("utt_keep.wav", "utterance_my_recording.wav", "notes.txt")}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    assert main(["corpus", str(out), "-n", "2"]) == 2
    assert capsys.readouterr().err == (
        f"amnets corpus: error: {out} is not empty and holds no corpus (transcripts.txt); give a new or "
        "empty directory, or --overwrite to write the corpus among its files (any named as the corpus's, "
        "utt000000.wav ..., are replaced)\n")
    assert sorted(os.listdir(out)) == sorted(mine)
    assert main(["corpus", str(out), "-n", "3", "--words", "1", "1", "--overwrite"]) == 0
    assert main(["corpus", str(out), "-n", "1", "--words", "1", "1", "--overwrite"]) == 0
    # the corpus's own third and second utterances are gone; nothing else is
    assert sorted(os.listdir(out)) == sorted([*mine, "transcripts.txt", "utt000000.wav"])
    assert all((out / name).read_bytes() == data for name, data in mine.items())
