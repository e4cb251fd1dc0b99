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
    (["demo", "--tiny", "--stream-threads", "0", "--out", "{tmp}"],
     "--stream-threads must be in [1, 2**31 - 1]; got 0"),
    # was "Overflow when unpacking long", naming nothing, after the three models had trained
    (["demo", "--tiny", "--stream-threads", str(2**31), "--out", "{tmp}"],
     "--stream-threads must be in [1, 2**31 - 1]; got 2147483648"),
    # were make_corpus's argument names (n_utterances, jobs) and "[Errno 17] File exists"
    (["corpus", "{tmp}/c", "-n", "0"], "amnets corpus: error: --utterances (-n) must be >= 1; got 0"),
    (["corpus", "{tmp}/c", "--jobs", "-1"], "amnets corpus: error: --jobs must be >= 0 (0: one per CPU); got -1"),
    (["corpus", "{corpus}/transcripts.txt"], "transcripts.txt is a file, not a directory; give a new or empty"),
    # a RuntimeError traceback from the allocator (384 GB of weights on a machine of tens)
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--hidden-size", "100000000"],
     "amnets train: error: out of memory (can't allocate memory: you tried to allocate 384000000000 bytes); lower"),
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
    # a sparse branch that keeps no block (the bias alone) was trained silently; the demo refuses it before
    # making its corpus and training the models before the sparse one
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--sparsity", "0.999", "--hidden-size",
      "32", "--block-size", "16", "--steps", "1"],
     "error: AmNetsEncoder: sparsity=0.999 with block_size=16: the pruning keeps no block of [W_ih | W_hh] "
     "in layer 0 (8 x 17 blocks), layer 1 (8 x 4 blocks), so the sparse branch there would be the bias "
     "alone"),
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--block-size", "1000", "--steps", "1"],
     "sparsity=0.8 with block_size=1000: the pruning keeps no block of [W_ih | W_hh] in layer 0 (2 x 1 "
     "blocks)"),
    # a low-rank branch costlier than the full one in layer 1 (rank 32 at H = 32) was trained silently
    (["train", "--data", "{corpus}", "--checkpoint-dir", "{tmp}/ck", "--cheap", "lowrank", "--rank", "32",
      "--hidden-size", "32", "--num-layers", "2", "--steps", "1"],
     "error: AmNetsEncoder: cheap='lowrank', rank=32: the cheap branch costs no fewer MACs per frame than the "
     "full one in layer 1 (10,240 >= 8,192), so choosing it saves nothing there; lower the rank"),
    (["demo", "--tiny", "--sparsity", "0.999", "--steps", "1", "--utterances", "5", "--out", "{tmp}"],
     "amnets demo: error: AmNetsEncoder: sparsity="),
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
    # were accepted: training diverged later, eval gave an empty hypothesis
    ("nan", "{path}: the audio holds non-finite samples (NaN or inf)"),
    # was the tokenizer's message alone, naming no file
    ("punct", "{path}: CharTokenizer.encode: text has characters outside \"' abcdefghijklmnopqrstuvwxyz\": "
              "['.']"),
])
def test_a_bad_audio_file_or_transcript_is_named_before_training(audio, message, tmp_path, capsys):
    # Was a RuntimeError from LogMel's padding, or soundfile's own traceback, out of the first epoch.
    import numpy as np
    import soundfile as sf

    good = write_corpus(tmp_path / "good", [3200])
    bad = write_corpus(tmp_path / "bad", [3200, 150 if audio == "short" else 3200])[1]
    if audio == "text":
        bad.write_text("not audio\n")
    elif audio == "nan":
        sf.write(bad, np.full(3200, np.nan, dtype="float32"), 16000, subtype="FLOAT")
    elif audio == "punct":
        (bad.parent / "transcripts.txt").write_text("utt000000 one two\nutt000001 one two.\n")
    for data in (["--data", str(bad.parent)],
                 ["--data", str(good[0].parent), "--eval-data", str(bad.parent)]):
        code, err = fails(["train", *data, "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck")]
                          + TINY_MODEL, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert message.replace("{path}", str(bad)) in err, err
        assert not (tmp_path / "ck").exists()  # refused before anything was trained or written


def test_data_errors_name_the_flag_and_what_to_give(tmp_path, capsys):
    from test_amnets_data import write_librispeech

    good = write_corpus(tmp_path / "good", [3200])[0].parent
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "transcripts.txt").write_text("")
    write_librispeech(str(tmp_path / "libri"))
    common = ["--steps", "1", "--checkpoint-dir", str(tmp_path / "ck")] + TINY_MODEL
    for data, message in (
            # was "SpeechDataset: items is empty"
            (["--data", str(good), "--eval-data", str(empty)],
             f"--eval-data: corpus_items: {empty / 'transcripts.txt'} lists no utterances"),
            # were "... has no transcripts.txt (not a make_corpus directory)": no word of --split
            (["--data", str(tmp_path / "libri")],
             f"--data: {tmp_path / 'libri'} has no transcripts.txt, so it is no corpus directory (amnets "
             "corpus); a LibriSpeech root needs --split (it holds dev-clean)"),
            (["--data", str(good), "--eval-data", str(tmp_path / "libri")],
             "a LibriSpeech root needs --eval-split")):
        code, err = fails(["train", *data] + common, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_checkpoint_dir_is_checked_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import amnets.cli

    good = write_corpus(tmp_path / "good", [3200])[0].parent
    monkeypatch.setattr(amnets.cli, "load_items", lambda *a, **k: pytest.fail("the data loaded first"))
    under_a_file = tmp_path / "good" / "transcripts.txt" / "ck"
    code, err = fails(["train", "--data", str(good), "--steps", "1", "--checkpoint-dir", str(under_a_file)]
                      + TINY_MODEL, capsys)
    assert code == 2 and err == (f"amnets train: error: --checkpoint-dir: cannot write to {under_a_file} "
                                 f"({good / 'transcripts.txt'} is not a directory)\n")


def test_audio_without_a_transcript_line_is_a_one_line_warning(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    data = write_corpus(tmp_path / "c", [3200])[0].parent
    sf.write(data / "utt000007.wav", np.zeros(3200, dtype="float32"), 16000)  # no line in transcripts.txt
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck")]
                + TINY_MODEL) == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"amnets train: warning: 1 audio file(s) in {data} have no transcript line and are left out, "
            f"e.g. {data / 'utt000007.wav'}") in err


def _ran(what):  # what unpickling a hostile checkpoint would call
    RAN.append(what)


RAN = []


class Hostile:
    def __reduce__(self):
        return _ran, ("code",)


def test_a_malformed_checkpoint_or_config_file_is_one_line(corpus, tmp_path, capsys):  # noqa: F811
    import torch

    from amnets.cli import model_from_checkpoint, read_checkpoint

    ckpt_dir = tmp_path / "ck"
    assert main(["train", "--steps", "1", "--data", corpus, "--checkpoint-dir", str(ckpt_dir)]
                + TINY_MODEL) == 0
    last = ckpt_dir / "last.pt"
    # Read with weights_only=True: what train writes still round-trips.
    saved = read_checkpoint(str(last))
    assert {"model", "optimizer", "config", "step", "tau", "best"} <= set(saved) and saved["step"] == 1
    model, cfg = model_from_checkpoint(saved, str(last))
    assert cfg["hidden_size"] == 32
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())

    def variant(name, edit):
        ckpt = torch.load(last, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)

    fit = "its weights do not fit the model its config describes"
    cases = [  # were tracebacks: RuntimeError size mismatch, Missing/Unexpected keys, AttributeError
        (variant("wide.pt", lambda c: c["config"].update(hidden_size=64)),
         f": {fit} (mismatched: encoder.weight_ih_l0 (128, 240) where the model has (256, 240), "),
        (variant("nobias.pt", lambda c: c["model"].pop("out.bias")), f": {fit} (missing: out.bias)"),
        (variant("swapped.pt", lambda c: c["config"].update(cheap="lowrank")),
         f": {fit} (missing: encoder.w_ih_u_l0, encoder.w_ih_v_l0, encoder.w_hh_u_l0 and 1 more; unexpected: "
         "encoder.block_mask_l0)"),
        (variant("badcfg.pt", lambda c: c.update(config="x")),
         " is not an amnets checkpoint (its model, config and step must be a dict, a dict and an int; got "),
        (variant("badvalue.pt", lambda c: c["config"].update(hidden_size="wide")),
         ": its config: hidden_size must be an integer; got 'wide'"),
        # weights_only: its pickled object is refused, never called (weights_only=False ran it)
        (variant("hostile.pt", lambda c: c.update(extra=Hostile())),
         " is not an amnets checkpoint: it holds pickled Python objects, which are not loaded (unpickling "
         "them could run code); Unsupported global: GLOBAL test_amnets_cli_errors._ran"),
        # was a TypeError traceback in --resume's comparison with it
        (variant("badbest.pt", lambda c: c.update(best="garbage")),
         " is not an amnets checkpoint (its best record must be none or a dict of wer, cer and step numbers; "
         "got 'garbage')"),
    ]
    text = tmp_path / "text.pt"  # was "holds pickled Python objects ... could run code"
    text.write_text("not a checkpoint\n")
    cases.append((str(text), " is not a checkpoint torch.load can read (Unsupported operand 110)"))
    for path, message in cases:
        for argv in (["eval", path], ["train", "--resume", path, "--steps", "5"]):
            code, err = fails(argv, capsys)
            assert code == 2 and len(err.splitlines()) == 1 and f"error: {path}{message}" in err, (argv, err)
    assert RAN == []
    for text, kind in (("null", "NoneType"), ("[1, 2]", "list"), ('"abc"', "str")):  # was a TypeError, or
        config = tmp_path / "c.json"                                        # "unknown keys ['a', 'b', 'c']"
        config.write_text(text)
        code, err = fails(["train", "--config", str(config)], capsys)
        assert code == 2 and err == (f"amnets train: error: config file {config}: must hold a table of "
                                     f'settings (a JSON object, e.g. {{"hidden_size": 64}}); got {kind}\n')


def test_a_non_integer_world_size_is_named(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    # was "invalid literal for int() with base 10: 'abc'", naming no variable
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code, err = fails(["train", "--data", corpus, "--steps", "1", "--checkpoint-dir", str(tmp_path)] + TINY_MODEL,
                      capsys)
    assert code == 2 and err == ("amnets train: error: the environment variable WORLD_SIZE must be an integer "
                                 "(torchrun sets it); got 'abc'\n")


def test_an_edited_checkpoints_weights_or_optimizer_state_is_one_line(tmp_path, capsys):
    # Were: AttributeError (a list where a tensor belongs), WER 1.0 and exit 0 (NaN weights decode to empty
    # hypotheses), a RuntimeError at the first optimizer step (exp_avg of the wrong shape).
    import torch

    data = write_corpus(tmp_path / "c", [3200, 3200])[0].parent
    ckpt_dir = tmp_path / "ck"
    assert main(["train", "--steps", "1", "--data", str(data), "--checkpoint-dir", str(ckpt_dir)]
                + TINY_MODEL) == 0
    last = ckpt_dir / "last.pt"

    def variant(name, edit):
        ckpt = torch.load(last, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)

    def first_exp_avg(ckpt):
        ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)

    weights = [
        (variant("list.pt", lambda c: c["model"].update({"out.bias": [0.0]})),
         ": its weights do not fit the model its config describes (mismatched: out.bias (a list) where the "
         "model has (29,))"),
        (variant("nan.pt", lambda c: c["model"]["out.bias"].fill_(float("nan"))),
         ": its weights hold NaN or inf (out.bias)"),
    ]
    for path, message in weights:
        for argv in (["eval", path, "--data", str(data), "--out", str(tmp_path / "ev")],
                     ["train", "--resume", path, "--steps", "2"]):
            code, err = fails(argv, capsys)
            assert code == 2 and err == f"amnets {argv[0]}: error: {path}{message}\n", (argv, err)
    # A sparse branch keeping no block or every block: refused from the flags, and loaded silently (was).
    masks = [(variant(name, lambda c, fill=fill: c["model"]["encoder.block_mask_l0"].fill_(fill)), words)
             for name, fill, words in (("no_block.pt", False, "keeps no block of [W_ih | W_hh] in layer 0"),
                                       ("all_blocks.pt", True, "costs no fewer MACs per frame than the full one"))]
    for path, words in masks:
        for argv in (["eval", path, "--data", str(data), "--out", str(tmp_path / "ev")],
                     ["train", "--resume", path, "--steps", "2"]):
            code, err = fails(argv, capsys)
            assert code == 2 and err.startswith(f"amnets {argv[0]}: error: {path}: AmNetsEncoder: ") \
                and words in err and err.count("\n") == 1, (argv, err)
    path = variant("exp_avg.pt", first_exp_avg)
    code, err = fails(["train", "--resume", path, "--steps", "2"], capsys)
    assert code == 2 and err == (f"amnets train: error: {path}: its optimizer state does not fit its model "
                                 "(exp_avg of encoder.weight_ih_l0 is (3,) where the parameter has (128, 240))\n"), err


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", str(2 ** 64), "config: seed must be in [-2**63, 2**64 - 1]; got 18446744073709551616"),
    ("--threads", str(2 ** 31), "config: threads must be in [0, 2**31 - 1]; got 2147483648")])
def test_an_overflowing_seed_or_thread_count_is_named(flag, value, message, tmp_path, capsys):
    # was "amnets train: error: Overflow when unpacking long long", naming neither
    data = write_corpus(tmp_path / "c", [3200])[0].parent
    code, err = fails(["train", "--data", str(data), "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                       flag, value], capsys)
    assert code == 2 and err == f"amnets train: error: {message}\n", err
