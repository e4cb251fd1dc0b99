"""amnets.data: tokenizer, espeak-ng corpus, LibriSpeech layout, features, dataset and collate."""

import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from amnets.data import (SAMPLE_RATE, WORDS, CharTokenizer, DataWarning, LogMel, SpeechDataset, collate,
                         corpus_items, librispeech_items, make_corpus, read_audio)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (make install installs it)")


def test_tokenizer_layout_and_round_trip():
    tok = CharTokenizer()
    assert tok.vocab_size == 29
    assert tok.encode("'") == [1] and tok.encode(" ") == [2] and tok.encode("az") == [3, 28]
    text = "don't stop the music"
    assert tok.decode(tok.encode(text.upper())) == text  # LibriSpeech is upper case
    assert tok.decode(torch.tensor(tok.encode(text))) == text


@pytest.mark.parametrize("call, match", [(lambda t: t.encode("hello!"), "characters outside"),
                                         (lambda t: t.encode(3), "str"),
                                         (lambda t: t.decode([0, 3]), "blank"),
                                         (lambda t: t.decode([29]), "labels"),
                                         (lambda t: t.decode(torch.tensor([[1, 2]])), "1-d integer tensor"),
                                         (lambda t: t.decode(torch.tensor([1.0])), "1-d integer tensor"),
                                         (lambda t: t.decode([1.5]), "must be ints")])
def test_tokenizer_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(CharTokenizer())


def test_logmel_shape_hop_and_normalisation():
    wave = torch.randn(SAMPLE_RATE)  # 1 s
    feats = LogMel()(wave)
    assert feats.shape == (SAMPLE_RATE // 160 + 1, 80)
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="wave"):
        LogMel()(torch.zeros(2, 100))


def test_logmel_refuses_what_would_give_no_features_or_non_finite_ones():
    for n_mels in (0, -1, 2.5, True):  # 0 built, and gave (T, 0) features
        with pytest.raises(ValueError, match="LogMel: n_mels must be an int >= 1"):
            LogMel(n_mels)
    with pytest.raises(TypeError, match="LogMel: wave must be real"):  # the imaginary part was dropped
        LogMel()(torch.randn(1600, dtype=torch.complex64))
    for wave in (torch.full((1600,), 1e30), torch.tensor([float("nan")] * 1600)):  # 1e30: finite in, inf out
        with pytest.raises(ValueError, match="LogMel: wave must be finite samples of moderate amplitude"):
            LogMel()(wave)
    assert LogMel()(torch.zeros(1600)).isfinite().all()  # silence is fine


def test_logmel_states_the_shortest_waveform_it_takes():
    # 200 samples or fewer was a RuntimeError from the reflection padding that centres the window
    for n in (1, 150, 200):
        with pytest.raises(ValueError, match=f"at least 201 samples \\(12.6 ms at 16 kHz\\); got {n}"):
            LogMel()(torch.randn(n))
    assert LogMel()(torch.randn(201)).shape == (2, 80)


def test_dataset_names_a_short_or_unreadable_audio_file_at_once(tmp_path):
    ok, short, text = (str(tmp_path / f"{name}.wav") for name in ("ok", "short", "text"))
    sf.write(ok, np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    sf.write(short, np.zeros(150, dtype=np.float32), SAMPLE_RATE)
    with open(text, "w") as f:
        f.write("not audio")
    with pytest.raises(ValueError, match=f"^{short}: LogMel: the waveform must hold at least 201 samples"):
        SpeechDataset([(ok, "a"), (short, "b")])  # from the header, before any features are computed
    sf.write(short, np.zeros(100, dtype=np.float32), 8000)  # 200 samples once resampled to 16 kHz
    with pytest.raises(ValueError, match="got 200$"):
        SpeechDataset([(short, "b")])
    with pytest.raises(ValueError, match=f"cannot read audio: Error opening '{text}'"):
        SpeechDataset([(text, "c")])
    with pytest.raises(ValueError, match=f"cannot read audio: Error opening '{text}'"):
        read_audio(text)
    assert SpeechDataset([(ok, "a")]).duration(0) == 0.1


@needs_espeak
def test_make_corpus_is_deterministic_and_has_silent_edges(tmp_path):
    a, b, c = (make_corpus(str(tmp_path / name), 3, seed=seed)
               for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    files = sorted(os.listdir(a))
    assert files == ["transcripts.txt", "utt000000.wav", "utt000001.wav", "utt000002.wav"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    transcripts = [(tmp_path / name / "transcripts.txt").read_text() for name in "ac"]
    assert transcripts[0] != transcripts[1]
    items = corpus_items(a)
    assert [os.path.basename(p) for p, _ in items] == files[1:]
    for path, text in items:
        assert 2 <= len(text.split()) <= 5 and set(text.split()) <= set(WORDS)
        info = sf.info(path)
        assert info.samplerate == SAMPLE_RATE and info.channels == 1
        wave = read_audio(path)
        edge = wave[: SAMPLE_RATE // 20]  # the first 50 ms: silence plus noise, at least 0.1 s of it
        assert edge.abs().max() < 0.05 < wave.abs().max()
        assert edge.std() > 0  # the noise is there


def test_make_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_utterances"):
        make_corpus(str(tmp_path), 0)
    with pytest.raises(ValueError, match="words_per_utterance"):
        make_corpus(str(tmp_path), 1, words_per_utterance=(3, 2))
    with pytest.raises(ValueError, match="transcripts.txt"):
        corpus_items(str(tmp_path))


def write_librispeech(root, split="dev-clean"):
    """A tiny tree in LibriSpeech's layout: 2 speakers, 3 chapters, FLAC at 16 kHz."""
    rng = np.random.default_rng(0)
    texts = {}
    for speaker, chapter, n in ((19, 198, 2), (19, 227, 1), (84, 121123, 2)):
        folder = os.path.join(root, split, str(speaker), str(chapter))
        os.makedirs(folder)
        lines = []
        for u in range(n):
            utt = f"{speaker}-{chapter}-{u:04d}"
            sf.write(os.path.join(folder, utt + ".flac"), rng.uniform(-0.3, 0.3, 1600 * (u + 2)), SAMPLE_RATE,
                     format="FLAC")
            texts[utt] = f"CHAPTER {['ALPHA', 'BETA'][u]} SAID IT'S {['ONE', 'TWO'][u]}"
            lines.append(f"{utt} {texts[utt]}\n")
        with open(os.path.join(folder, f"{speaker}-{chapter}.trans.txt"), "w") as f:
            f.writelines(lines)
    return texts


def test_librispeech_items_and_dataset(tmp_path):
    texts = write_librispeech(str(tmp_path))
    items = librispeech_items(str(tmp_path), "dev-clean")
    assert [os.path.basename(p)[:-5] for p, _ in items] == sorted(texts)
    assert all(text == texts[os.path.basename(p)[:-5]] for p, text in items)
    ds = SpeechDataset(items)
    feats, labels = ds[1]  # 19-198-0001: 3 * 1600 samples
    assert feats.shape == (3 * 1600 // 160 + 1, 80)
    assert ds.tokenizer.decode(labels) == "chapter beta said it's two"
    with pytest.raises(ValueError, match="split"):
        librispeech_items(str(tmp_path), "train-clean-100")
    # stray files beside the speaker and chapter directories: were "[Errno 20] Not a directory"
    for stray in ("dev-clean/README.TXT", "dev-clean/19/.DS_Store"):
        (tmp_path / stray).write_text("x")
    # and hidden directories (a notebook's checkpoints), at split and speaker level: were "chapter ... has no
    # 19-.ipynb_checkpoints.trans.txt"
    for hidden in ("dev-clean/.ipynb_checkpoints", "dev-clean/19/.ipynb_checkpoints"):
        (tmp_path / hidden).mkdir()
    assert librispeech_items(str(tmp_path), "dev-clean") == items


def test_dataset_keeps_features_up_to_its_cache_budget(tmp_path):
    # The cache was unbounded: every training process held the whole corpus's features (~11.5 GB for
    # LibriSpeech train-clean-100). Items past the budget are computed again on each read, equal.
    write_librispeech(str(tmp_path))
    items = librispeech_items(str(tmp_path), "dev-clean")
    one = SpeechDataset(items)[1][0].nbytes  # 19-198-0001
    ds = SpeechDataset(items, cache_bytes=one)
    first = ds[1][0]
    assert ds[1][0] is first and set(ds._cache) == {1}  # kept: the budget exactly
    again = [ds[i][0] for i in (0, 2)]
    assert set(ds._cache) == {1} and all(ds[i][0] is not a for i, a in zip((0, 2), again))
    assert all(torch.equal(ds[i][0], a) for i, a in zip((0, 2), again))
    assert not SpeechDataset(items, cache=False)._cache_left
    full = SpeechDataset(items)
    assert all(full[i][0] is full[i][0] for i in range(len(items)))  # the default budget: all kept


def test_dataset_rejects_digits_and_empty_transcripts(tmp_path):
    write_librispeech(str(tmp_path))
    items = librispeech_items(str(tmp_path), "dev-clean")
    with pytest.raises(ValueError, match="characters outside"):
        SpeechDataset([(items[0][0], "CHAPTER 19")])
    with pytest.raises(ValueError, match="empty transcript"):
        SpeechDataset([(items[0][0], "")])


def test_collate_pads_and_reports_lengths():
    batch = [(torch.ones(5, 80), torch.tensor([3, 4])), (torch.full((2, 80), 2.0), torch.tensor([5, 6, 7]))]
    feats, feat_lens, targets, target_lens = collate(batch)
    assert feats.shape == (2, 5, 80) and feat_lens.tolist() == [5, 2] and target_lens.tolist() == [2, 3]
    assert targets.tolist() == [[3, 4, 0], [5, 6, 7]]
    assert feats[1, 2:].abs().sum() == 0 and (feats[1, :2] == 2).all()
    with pytest.raises(ValueError, match="empty targets"):
        collate([(torch.ones(3, 80), torch.tensor([], dtype=torch.long))])
    with pytest.raises(ValueError, match="feats"):
        collate([(torch.ones(3, 80), torch.tensor([1])), (torch.ones(3, 40), torch.tensor([1]))])
    # each was a raw error (unpacking, torch.tensor of a list) or, for 2-d labels, (1, 1, 2) targets
    with pytest.raises(ValueError, match=r"collate: batch must be a list of \(feats, labels\) pairs"):
        collate([(torch.ones(3, 80), torch.tensor([1]), 0)])
    for labels, got in (([1, 2], "'list'"), (torch.tensor([[1, 2]]), r"\(1, 2\)")):
        with pytest.raises(ValueError, match=rf"labels 1-d \(U,\); got labels \[{got}\]"):
            collate([(torch.ones(3, 80), labels)])


def test_audio_without_a_transcript_line_is_left_out_with_a_warning(tmp_path):
    # Were left out silently: a transcript file missing lines lost its utterances unnoticed.
    write_librispeech(str(tmp_path))
    folder = tmp_path / "dev-clean" / "19" / "198"
    sf.write(folder / "19-198-0009.flac", np.zeros(1600), SAMPLE_RATE, format="FLAC")
    with pytest.warns(DataWarning, match=f"^1 audio file\\(s\\) in {tmp_path / 'dev-clean'} have no "
                                         f"transcript line and are left out, e.g. "
                                         f"{folder / '19-198-0009.flac'}$"):
        assert len(librispeech_items(str(tmp_path), "dev-clean")) == 5
    (folder / "19-198-0009.flac").rename(folder / "19-198-0009.FLAC")  # was left out without a word
    with pytest.warns(DataWarning, match=f"e.g. {folder / '19-198-0009.FLAC'}$"):
        assert len(librispeech_items(str(tmp_path), "dev-clean")) == 5
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("utt000000.wav", "utt000001.wav"):
        sf.write(corpus / name, np.zeros(1600), SAMPLE_RATE)
    (corpus / "transcripts.txt").write_text("utt000000 one\n")
    with pytest.warns(DataWarning, match=f"e.g. {corpus / 'utt000001.wav'}$"):
        assert [p for p, _ in corpus_items(str(corpus))] == [str(corpus / "utt000000.wav")]


def test_transcript_files_refuse_duplicates_and_take_a_bom_blanks_and_tabs(tmp_path):
    for name in ("utt000000.wav", "utt000001.wav"):
        sf.write(tmp_path / name, np.zeros(1600), SAMPLE_RATE)
    transcripts = tmp_path / "transcripts.txt"
    transcripts.write_text("utt000000 one\nutt000001 two\nutt000000 three\n")
    with pytest.raises(ValueError, match=f"^{transcripts}:3: utterance 'utt000000' is listed again "
                                         "\\(first at line 1\\)$"):
        corpus_items(str(tmp_path))
    # A byte-order mark was read as part of the first id ("no audio file .../\ufeffutt000000.wav"), as
    # was a leading blank; a tab after the id made the id "utt000001\ttwo".
    transcripts.write_bytes("\ufeffutt000000 one two\n  utt000001\ttwo\n".encode("utf-8"))
    assert corpus_items(str(tmp_path)) == [(str(tmp_path / "utt000000.wav"), "one two"),
                                           (str(tmp_path / "utt000001.wav"), "two")]
    transcripts.write_text("\n")
    with pytest.raises(ValueError, match="transcripts.txt lists no utterances"):
        corpus_items(str(tmp_path))
    transcripts.write_bytes("utt000000 caf\u00e9\n".encode("latin-1"))  # was the codec's message alone
    with pytest.raises(ValueError, match=f"^{transcripts}: not UTF-8 text \\(invalid continuation byte at byte 13\\)$"):
        corpus_items(str(tmp_path))


def test_a_chapter_without_its_transcripts_is_named(tmp_path):
    write_librispeech(str(tmp_path))
    (tmp_path / "dev-clean" / "19" / "227" / "19-227.trans.txt").unlink()  # was a raw [Errno 2]
    chapter = tmp_path / "dev-clean" / "19" / "227"
    with pytest.raises(ValueError, match=f"^librispeech_items: chapter {chapter} has no 19-227.trans.txt$"):
        librispeech_items(str(tmp_path), "dev-clean")


def test_dataset_names_the_file_of_a_transcript_outside_the_vocabulary(tmp_path):
    path = str(tmp_path / "a.wav")
    sf.write(path, np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    # was the tokenizer's message alone, naming neither the file nor the utterance
    with pytest.raises(ValueError, match=f"^{path}: CharTokenizer.encode: text has characters outside "
                                         ".*\\['.'\\]"):
        SpeechDataset([(path, "hello.")])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_audio_is_refused_naming_the_file(bad, tmp_path):
    # Was accepted: training diverged later with a misleading message, eval gave an empty hypothesis.
    ok, path = str(tmp_path / "ok.wav"), str(tmp_path / "bad.wav")
    sf.write(ok, np.zeros(1600, dtype=np.float32), SAMPLE_RATE, subtype="FLOAT")
    wave = np.zeros(1600, dtype=np.float32)
    wave[800] = bad
    sf.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    message = f"^{path}: the audio holds non-finite samples \\(NaN or inf\\)$"
    with pytest.raises(ValueError, match=message):
        read_audio(path)
    with pytest.raises(ValueError, match=message):  # at once, before any features are computed
        SpeechDataset([(ok, "a"), (path, "b")])
    assert SpeechDataset([(ok, "a")])[0][0].isfinite().all()


def test_audio_loud_enough_to_overflow_the_features_is_refused(tmp_path):
    # A float WAV at 1e19 passed and gave non-finite log-mel features (its window power overflows float32).
    path = str(tmp_path / "loud.wav")
    wave = np.zeros(1600, dtype=np.float32)
    wave[800] = 1e19
    sf.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match=f"^{path}: the audio's samples reach 1e\\+19; float audio is expected "
                                         "within \\[-1, 1\\]"):
        SpeechDataset([(path, "a")])
    wave[800] = 1e6  # far beyond [-1, 1] but harmless: the features are normalised per utterance
    sf.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    assert SpeechDataset([(path, "a")])[0][0].isfinite().all()


def test_utterance_ids_name_files_in_the_corpus_folder_only(tmp_path):
    # Was accepted: the audio is <folder>/<id>.wav, so an id "../outside" (or an absolute path, which
    # os.path.join lets replace the folder) read audio from outside the corpus.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(tmp_path / "outside.wav", np.zeros(1600), SAMPLE_RATE)
    sf.write(corpus / "utt000000.wav", np.zeros(1600), SAMPLE_RATE)
    for utt in ("../outside", str(tmp_path / "outside"), ".."):
        (corpus / "transcripts.txt").write_text(f"utt000000 one\n{utt} two\n")
        with pytest.raises(ValueError, match=f":2: utterance id '{re.escape(utt)}' must be a file name in "):
            corpus_items(str(corpus))


@pytest.mark.parametrize("kwargs, match", [
    # each was accepted: random.randint raised, a string was iterated, a negative silence was empty
    (dict(rates=(220, 120)), r"rates must be \(low, high\), ints with 1 <= low <= high; got \(220, 120\)"),
    (dict(edge_silence=(-0.5, 0.5)), r"edge_silence must be \(low, high\), finite numbers with 0.0 <= low"),
    (dict(words_per_utterance="ab"), r"words_per_utterance must be \(low, high\), ints .*; got 'ab'"),
    (dict(pitches=(0, 99.5)), "pitches must be"), (dict(word_gap=(True, 3)), "word_gap must be"),
    (dict(noise_db=(float("nan"), -40.0)), r"noise_db must be \(low, high\), finite numbers with low <= high"),
    (dict(voices="en-us"), r"voices must be a non-empty list of espeak-ng voice names .*; got 'en-us'"),
    (dict(voices=[]), "voices must be a non-empty list"), (dict(voices=["en-us", 3]), "voices must be")])
def test_make_corpus_checks_its_ranges_and_voices_before_any_synthesis(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=f"make_corpus: {match}"):
        make_corpus(str(tmp_path / "c"), 1, **kwargs)
    assert not (tmp_path / "c").exists()  # refused before the directory was made
