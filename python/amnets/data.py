"""Speech data, offline: an espeak-ng corpus, a LibriSpeech reader, a character tokenizer, log-mel features.

  make_corpus        synthesise sentences from WORDS with espeak-ng (several voices, rates, pitches), add
                     silence and low-level noise, write 16 kHz WAVs + transcripts.txt; same seed, same corpus
  corpus_items       (audio path, transcript) pairs of such a directory
  librispeech_items  the same for a LibriSpeech split (<root>/<split>/<spk>/<chapter>/*.flac + .trans.txt)
  CharTokenizer      blank 0, then apostrophe, space, a-z
  LogMel             80-dim log-mel, 25 ms window, 10 ms hop, per-utterance mean/variance normalised
  SpeechDataset, collate   (feats (B, T, 80), feat_lens, targets (B, U), target_lens) for AmNetsRNNT.loss

Audio is read with soundfile: torchaudio.load needs the torchcodec package for every format now.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import re
import shutil
import string
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from .decode import count

SAMPLE_RATE = 16000
TRANSCRIPTS = "transcripts.txt"
# The audio files make_corpus writes; only files so named are ever removed as an old corpus's.
CORPUS_AUDIO = re.compile(r"utt\d{6,}\.wav")
# soundfile subtypes whose samples are floats (integer PCM, FLAC and the rest are finite by construction)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


class DataWarning(UserWarning):
    """Data that loads but not all of it: audio files without a transcript line (left out)."""


# Common words with distinct spellings: enough to need real character modelling, few enough to learn fast.
WORDS = ("the", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "red", "green", "blue",
         "black", "white", "cat", "dog", "bird", "fish", "house", "tree", "water", "light", "music",
         "play", "open", "close", "call", "home", "time", "today", "morning", "night", "please", "don't",
         "it's")
# English voices shipped with Debian's espeak-ng (`espeak-ng --voices=en`), male and female variants.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-gb+f2", "en-us+m3")


class CharTokenizer:
    """Characters to labels: 0 is the RNN-T blank, then "'", " ", "a".."z" (1..28). Text is lower-cased;
    any other character is an error (LibriSpeech transcripts use exactly these)."""

    SYMBOLS = "' " + string.ascii_lowercase

    def __init__(self):
        self.index = {ch: i + 1 for i, ch in enumerate(self.SYMBOLS)}
        self.vocab_size = len(self.SYMBOLS) + 1

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"CharTokenizer.encode: text must be a str; got {type(text).__name__}")
        bad = sorted({ch for ch in text.lower() if ch not in self.index})
        if bad:
            raise ValueError(f"CharTokenizer.encode: text has characters outside {self.SYMBOLS!r}: {bad}")
        return [self.index[ch] for ch in text.lower()]

    def decode(self, labels) -> str:
        if isinstance(labels, Tensor) and (labels.dim() != 1 or labels.is_floating_point()):
            raise ValueError(f"CharTokenizer.decode: labels must be a 1-d integer tensor or a sequence of ints; "
                             f"got a {labels.dtype} tensor of shape {tuple(labels.shape)}")
        labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
        bad = [i for i in labels
               if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 1 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"CharTokenizer.decode: labels must be ints in [1, {self.vocab_size - 1}] "
                             f"(0 is the blank); got {bad[0]!r}")
        return "".join(self.SYMBOLS[i - 1] for i in labels)


# ---------------------------------------------------------------------------------------------------
# audio


def _soundfile(call, path: str):
    """call(path) of soundfile; a file it cannot read (not audio, truncated) is a ValueError naming it."""
    try:
        return call(path)
    except sf.LibsndfileError as exc:  # its message names the path
        raise ValueError(f"cannot read audio: {exc}") from exc


MAX_PEAK = 1e15  # read_audio's bound on a sample's magnitude (float files can hold anything)


def read_audio(path: str) -> Tensor:
    """Mono float32 waveform (N,) at 16 kHz from any file soundfile reads (WAV, FLAC, ...); a file holding
    NaN or inf samples, or samples beyond MAX_PEAK (possible in float WAVs), is a ValueError naming it."""
    audio, rate = _soundfile(lambda p: sf.read(p, dtype="float32", always_2d=True), path)
    if not np.isfinite(audio).all():  # training would diverge on it, decoding emit nothing, both silently
        raise ValueError(f"{path}: the audio holds non-finite samples (NaN or inf)")
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > MAX_PEAK:  # its window power overflows float32 from ~1e18: non-finite features, the same silence
        raise ValueError(f"{path}: the audio's samples reach {peak:.3g}; float audio is expected within [-1, 1] "
                         f"(at most {MAX_PEAK:g} is taken)")
    wave = torch.from_numpy(audio.mean(axis=1))
    return wave if rate == SAMPLE_RATE else torchaudio.functional.resample(wave, rate, SAMPLE_RATE)


class LogMel(torch.nn.Module):
    """(N,) waveform at 16 kHz -> (T, n_mels) log-mel, 25 ms Hann window, 10 ms hop (T = N // 160 + 1),
    for N >= min_samples (201: 12.6 ms).

    Each utterance is normalised to zero mean and unit variance per mel bin: the corpus mixes voices
    and recording levels, and a small model should not spend capacity on the offset."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        self.n_mels = n_mels = count("LogMel", "n_mels", n_mels)  # 0 gave (T, 0) features
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, win_length=400,
                                                        hop_length=160, n_mels=n_mels)
        # The window is centred by reflecting n_fft // 2 samples at each end, which needs more than that.
        self.min_samples = self.mel.n_fft // 2 + 1

    def check_samples(self, n: int) -> None:
        """A ValueError unless a waveform of n samples is long enough."""
        if n < self.min_samples:
            raise ValueError(f"LogMel: the waveform must hold at least {self.min_samples} samples "
                             f"({1e3 * self.min_samples / SAMPLE_RATE:.1f} ms at 16 kHz); got {n}")

    def forward(self, wave: Tensor) -> Tensor:
        if not isinstance(wave, Tensor) or wave.dim() != 1 or wave.numel() == 0:
            got = tuple(wave.shape) if isinstance(wave, Tensor) else type(wave).__name__
            raise ValueError(f"LogMel: wave must be a non-empty 1-d waveform; got {got}")
        if wave.is_complex():  # .float() would drop the imaginary part
            raise TypeError(f"LogMel: wave must be real; got {wave.dtype}")
        self.check_samples(wave.numel())
        feats = torch.log(self.mel(wave.float()) + 1e-6).T
        feats = (feats - feats.mean(0)) / (feats.std(0, unbiased=False) + 1e-5)
        if not torch.isfinite(feats).all():  # non-finite samples, or a power past float32 (|wave| ~ 1e19 and up)
            raise ValueError("LogMel: wave must be finite samples of moderate amplitude (audio in [-1, 1]); "
                             f"its features are not finite (largest |sample| {wave.abs().max().item():.3g})")
        return feats


# ---------------------------------------------------------------------------------------------------
# espeak-ng corpus


def _espeak(text: str, voice: str, rate: int, pitch: int, gap: int) -> Tensor:
    """espeak-ng's speech for `text` as a 16 kHz waveform; gap: extra pause between words in 10 ms units."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("make_corpus: espeak-ng is not installed (Debian: apt-get install espeak-ng; "
                           "`make install` does it)")
    command = [exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-g", str(gap), "--stdout", text]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:  # an unknown voice, most likely: espeak-ng's own words say so
        message = done.stderr.decode(errors="replace").strip()
        raise ValueError(f"make_corpus: espeak-ng -v {voice} failed: {message or f'exit {done.returncode}'}")
    audio, sr = sf.read(BytesIO(done.stdout), dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(audio), sr, SAMPLE_RATE)


def _corpus_range(name: str, value, least, integers: bool = True) -> tuple:
    """make_corpus's inclusive (low, high) ranges: least <= low <= high, ints (espeak-ng's flags take no
    fractions) or finite real numbers (seconds, dB)."""
    kind = (lambda v: isinstance(v, numbers.Integral)) if integers else \
        (lambda v: isinstance(v, numbers.Real) and math.isfinite(v))
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(kind(v) and not isinstance(v, (bool, np.bool_)) for v in value)
            and least <= value[0] <= value[1]):
        what = "ints" if integers else "finite numbers"
        bound = f"{least} <= " if least > -math.inf else ""
        raise ValueError(f"make_corpus: {name} must be (low, high), {what} with {bound}low <= high; got {value!r}")
    return tuple(value)


def make_corpus(out_dir: str, n_utterances: int, seed: int = 0, words_per_utterance: tuple[int, int] = (2, 5),
                voices=VOICES, rates: tuple[int, int] = (120, 220), pitches: tuple[int, int] = (25, 75),
                word_gap: tuple[int, int] = (0, 15), edge_silence: tuple[float, float] = (0.1, 0.6),
                noise_db: tuple[float, float] = (-55.0, -40.0), jobs: int = 0) -> str:
    """Write n_utterances WAVs (16 kHz, 16-bit) and transcripts.txt ("<id> <text>" per line) to out_dir.

    Per utterance, drawn from `seed`: 2-5 words of WORDS, a voice, espeak-ng rate (-s, words per minute),
    pitch (-p, 0-99) and word gap (-g, 10 ms units), leading and trailing silence (seconds each) and white
    noise at `noise_db` dB below full scale over the whole file, so that silent, "easy" frames exist.
    Ranges are inclusive (low, high). The same arguments give the same files, whatever `jobs` (espeak-ng
    processes run at once; 0: one per CPU). Returns out_dir.
    """
    if isinstance(n_utterances, bool) or not isinstance(n_utterances, int) or n_utterances < 1:
        raise ValueError(f"make_corpus: n_utterances must be an int >= 1; got {n_utterances!r}")
    low, high = _corpus_range("words_per_utterance", words_per_utterance, 1)
    for name, value, least in (("rates", rates, 1), ("pitches", pitches, 0), ("word_gap", word_gap, 0)):
        _corpus_range(name, value, least)
    _corpus_range("edge_silence", edge_silence, 0.0, integers=False)
    _corpus_range("noise_db", noise_db, -math.inf, integers=False)
    # A string is a sequence of characters: "en-us" drew the voices "e", "n", "-", ...
    if isinstance(voices, str) or not isinstance(voices, (list, tuple)) or not voices \
            or not all(isinstance(v, str) and v for v in voices):
        raise ValueError("make_corpus: voices must be a non-empty list of espeak-ng voice names (e.g. "
                         f"[\"en-us\"]); got {voices!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise ValueError(f"make_corpus: jobs must be an int >= 0; got {jobs!r}")
    for voice in dict.fromkeys(voices):  # an unknown voice now, not after writing the WAVs before its first use
        _espeak("a", voice, rates[0], pitches[0], 0)
    rng = random.Random(seed)
    noise_gen = np.random.default_rng(seed)
    # Every random draw first, in one fixed order (espeak-ng consumes none), so that the synthesis can run
    # in parallel and the corpus still depends on the seed alone.
    draws = []
    for _ in range(n_utterances):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
        speech_args = (text, rng.choice(voices), rng.randint(*rates), rng.randint(*pitches),
                       rng.randint(*word_gap))
        lead, trail = (int(rng.uniform(*edge_silence) * SAMPLE_RATE) for _ in range(2))
        draws.append((speech_args, lead, trail, 10 ** (rng.uniform(*noise_db) / 20)))
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:  # threads wait on espeak-ng processes
        speeches = pool.map(lambda d: _espeak(*d[0]), draws)  # in order, each written as it comes
        for i, (speech, ((text, *_), lead, trail, level)) in enumerate(zip(speeches, draws)):
            speech = speech * (0.5 / speech.abs().max().clamp(min=1e-4))  # the same level for every voice
            wave = torch.cat([speech.new_zeros(lead), speech, speech.new_zeros(trail)]).numpy()
            wave = wave + noise_gen.standard_normal(wave.shape).astype(np.float32) * level
            utt = f"utt{i:06d}"
            sf.write(os.path.join(out_dir, utt + ".wav"), np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
            lines.append(f"{utt} {text}\n")
    with open(os.path.join(out_dir, TRANSCRIPTS), "w") as f:
        f.writelines(lines)
    return out_dir


def _read_transcripts(path: str, folder: str, ext: str) -> list[tuple[str, str]]:
    """(audio path, text) per "<id> <text>" line of path; the audio is <folder>/<id><ext>."""
    items, seen = [], {}
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first id
    with open(path, encoding="utf-8-sig") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:  # named here: the caller's message gave the codec's words alone
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for n, line in enumerate(lines, 1):
            fields = line.split(None, 1)  # leading blanks and a tab after the id are no part of either
            if not fields:
                continue
            utt, text = fields[0], fields[1].strip() if len(fields) > 1 else ""
            if not text:
                raise ValueError(f"{path}:{n}: utterance {utt!r} has an empty transcript")
            if os.sep in utt or (os.altsep and os.altsep in utt) or utt in (".", ".."):
                # the audio is <folder>/<id><ext>: an id "../x" or "/x" would read a file outside the folder
                raise ValueError(f"{path}:{n}: utterance id {utt!r} must be a file name in {folder} (no path "
                                 "separator, not '.' or '..')")
            if utt in seen:  # would be trained on twice
                raise ValueError(f"{path}:{n}: utterance {utt!r} is listed again (first at line {seen[utt]})")
            seen[utt] = n
            audio = os.path.join(folder, utt + ext)
            if not os.path.isfile(audio):
                raise ValueError(f"{path}:{n}: no audio file {audio}")
            items.append((audio, text))
    return items


def _unlisted(folder: str, ext: str, items: list[tuple[str, str]]) -> list[str]:
    """The <ext> audio files of folder that no item names."""
    listed = {os.path.basename(p) for p, _ in items}
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(ext) and n not in listed)  # (an upper-case .FLAC is unlisted, not unseen)


def _warn_unlisted(unlisted: list[str], where: str) -> None:
    if unlisted:
        warnings.warn(f"{len(unlisted)} audio file(s) in {where} have no transcript line and are left out, "
                      f"e.g. {unlisted[0]}", DataWarning, stacklevel=3)


def corpus_items(corpus_dir: str) -> list[tuple[str, str]]:
    """(wav path, transcript) of a make_corpus directory, in transcript order. WAVs it does not list are
    left out with a DataWarning."""
    path = os.path.join(corpus_dir, TRANSCRIPTS)
    if not os.path.isfile(path):
        raise ValueError(f"corpus_items: {corpus_dir!r} has no {TRANSCRIPTS} (not a make_corpus directory)")
    items = _read_transcripts(path, corpus_dir, ".wav")
    if not items:
        raise ValueError(f"corpus_items: {path} lists no utterances")
    _warn_unlisted(_unlisted(corpus_dir, ".wav", items), corpus_dir)
    return items


def librispeech_items(root: str, split: str) -> list[tuple[str, str]]:
    """(flac path, transcript) of every utterance of <root>/<split> (e.g. train-clean-100), by speaker and
    chapter (sorted by name), each chapter in its transcript's line order.

    Layout: <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac, one
    <speaker>-<chapter>.trans.txt per chapter with lines "<speaker>-<chapter>-<utt> TRANSCRIPT". FLACs no
    line lists are left out with a DataWarning.
    """
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise ValueError(f"librispeech_items: no split directory {base!r}")
    items, unlisted = [], []
    subdirs = lambda d: sorted(n for n in os.listdir(d)  # noqa: E731
                               if os.path.isdir(os.path.join(d, n)) and not n.startswith("."))
    # a stray file (a README, .DS_Store) or hidden directory (.ipynb_checkpoints) is no speaker or chapter
    for speaker in subdirs(base):
        for chapter in subdirs(os.path.join(base, speaker)):
            folder = os.path.join(base, speaker, chapter)
            transcripts = os.path.join(folder, f"{speaker}-{chapter}.trans.txt")
            if not os.path.isfile(transcripts):
                raise ValueError(f"librispeech_items: chapter {folder} has no "
                                 f"{os.path.basename(transcripts)}")
            chapter_items = _read_transcripts(transcripts, folder, ".flac")
            items += chapter_items
            unlisted += _unlisted(folder, ".flac", chapter_items)
    if not items:
        raise ValueError(f"librispeech_items: {base!r} holds no utterances")
    _warn_unlisted(unlisted, base)
    return items


# ---------------------------------------------------------------------------------------------------
# dataset


# Features a SpeechDataset keeps in memory at most (per process), by default: 2 GiB holds about 18 hours
# of 80-mel frames (32 KB a second of audio). Unbounded, LibriSpeech train-clean-100 held ~11.5 GB in every
# training process, since each rank reads every utterance over its reshuffled epochs.
CACHE_BYTES = 2 << 30


class SpeechDataset(torch.utils.data.Dataset):
    """(feats (T, 80), labels (U,)) per (audio path, transcript) item. Features are computed once and kept
    in memory (cache=True), the first-read items up to cache_bytes (default CACHE_BYTES, 2 GiB); items past
    that are computed again on each read. The demo's corpora fit many times over.
    Every file's header is read at once (and a float file's samples): one soundfile cannot read, too short
    for LogMel, holding NaN or inf, or a transcript with characters the tokenizer lacks, is an error naming
    it now rather than hours into training."""

    def __init__(self, items: list[tuple[str, str]], tokenizer: CharTokenizer | None = None,
                 features: LogMel | None = None, cache: bool = True, cache_bytes: int = CACHE_BYTES):
        if not items:
            raise ValueError("SpeechDataset: items is empty")
        self.items = list(items)
        self.tokenizer = tokenizer or CharTokenizer()
        self.features = features or LogMel()
        self.labels, self.seconds = [], []
        for path, text in self.items:
            labels = self._named(path, self.tokenizer.encode, text)
            if not labels:
                raise ValueError(f"SpeechDataset: empty transcript for {path}")
            self.labels.append(torch.tensor(labels, dtype=torch.long))
            info = _soundfile(sf.info, path)  # the header only: no decoding
            self.seconds.append(info.frames / info.samplerate)
            if info.subtype in FLOAT_SUBTYPES:  # only float samples can be NaN or inf: read those now
                read_audio(path)
            if isinstance(self.features, LogMel):  # read_audio's length: resample rounds up
                samples = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
                self._named(path, self.features.check_samples, samples)
        self._cache: dict[int, Tensor] = {}
        self._cache_left = cache_bytes if cache else 0

    @staticmethod
    def _named(path: str, call, *args):
        """call(*args); its ValueError (LogMel's and the tokenizer's say nothing of the file) names the
        audio file."""
        try:
            return call(*args)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.items)

    def duration(self, i: int) -> float:
        """Seconds of audio of item i, from the file's header (no decoding)."""
        return self.seconds[i]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        feats = self._cache.get(i)
        if feats is None:
            with torch.no_grad():
                path = self.items[i][0]
                feats = self._named(path, self.features, read_audio(path))
            if feats.nbytes <= self._cache_left:
                self._cache[i] = feats
                self._cache_left -= feats.nbytes
        return feats, self.labels[i]


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero-pad a list of (feats (T, F), labels (U,)) to (feats (B, T, F), feat_lens (B,), targets (B, U),
    target_lens (B,)); label padding is 0 (AmNetsRNNT.loss ignores positions past target_lens)."""
    if not batch:
        raise ValueError("collate: batch is empty")
    if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in batch):
        raise ValueError("collate: batch must be a list of (feats, labels) pairs")
    feats, labels = zip(*batch)
    if not all(isinstance(t, Tensor) for t in feats + labels) or any(lab.dim() != 1 for lab in labels):
        got = [tuple(lab.shape) if isinstance(lab, Tensor) else type(lab).__name__ for lab in labels]
        raise ValueError(f"collate: feats and labels must be tensors, labels 1-d (U,); got labels {got}")
    if any(f.dim() != 2 or f.shape[1] != feats[0].shape[1] for f in feats):
        shapes = [tuple(f.shape) for f in feats]
        raise ValueError(f"collate: feats must all be (T, F) with one F; got {shapes}")
    if any(len(lab) == 0 for lab in labels):
        raise ValueError("collate: an utterance has empty targets")
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad(list(feats), batch_first=True), torch.tensor([len(f) for f in feats]),
            pad(list(labels), batch_first=True), torch.tensor([len(lab) for lab in labels]))
