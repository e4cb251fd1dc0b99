"""`amnets corpus|train|eval|demo` (also `python -m amnets ...`).

  corpus  an espeak-ng corpus directory (amnets.data.make_corpus): WAVs and transcripts.txt. A directory
          holding anything needs --overwrite; only the audio a corpus there had written (utt<NNNNNN>.wav)
          is ever removed.
  train   AdamW on an espeak-ng corpus directory or a LibriSpeech split; Gumbel temperature annealed
          exponentially from tau0 to tau_min over anneal_steps (fixed by the first run, so --resume continues
          the schedule); cost_weight (and optional budget) on the compute cost. Prints the configuration and
          parameter counts first; validates on --eval-data every --eval-every steps; writes last.pt, best.pt
          (lowest validation WER), averaged.pt (--average-last K), config.json and log.csv to
          --checkpoint-dir (a new run refuses one holding another run's last.pt, best.pt, averaged.pt or
          step-<N>.pt: --resume continues that run). Under torchrun it trains data-parallel (DistributedDataParallel, gloo on the CPU).
  eval    greedy (--beam 1) or beam-search decoding of a checkpoint, on the checkpoint's data unless --data
          is given: WER, CER, fraction of frames on the full branch, MACs per frame; writes hyps.txt,
          refs.txt, utterances.jsonl (per utterance: WER, CER, realized cost) and summary.json to --out.
  demo    a small espeak-ng corpus, a dense baseline and both AmNets variants trained on the CPU, and a table
          of WER, full-branch fraction, MACs per frame, streaming time per frame and the user-perceived
          latency on a simulated device running the dense model at 1.2x real time; results.json, table.txt.
          The corpus in --out is reused when this demo made it with the same --utterances and --seed, else
          made anew.

Configuration: the defaults in CONFIG, overridden by a checkpoint's config (eval, --resume), then by a
--config file (JSON or TOML, the same flat keys as the command's flags), then by command-line flags.
A mistake in what was given (a path, a value, a checkpoint) prints one line, `amnets <command>: error: ...`,
and exits 2 (a training run that diverges: 1); `amnets --debug ...` shows the traceback instead. Data that
loads only in part (audio files no transcript line lists) is one line too, `amnets <command>: warning: ...`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import tomllib
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

import amnets_kernels as ak
from amnets_kernels.nn import NotCheaperWarning

from .data import (CORPUS_AUDIO, TRANSCRIPTS, VOICES, CharTokenizer, DataWarning, SpeechDataset, collate,
                   corpus_items, librispeech_items, make_corpus)
from .encoder import CHEAP_KINDS, FORCE_KINDS
from .latency import simulate_latency
from .model import AmNetsRNNT, stack_frames

# key: (default, help). A default of None takes a value of the type named in NULLABLE.
CONFIG = {
    # data
    "data": ("", "an espeak-ng corpus directory (amnets corpus) or a LibriSpeech root (with --split)"),
    "split": ("", "LibriSpeech split under --data, e.g. train-clean-100; empty: --data is a corpus dir"),
    "eval_data": ("", "validation data, decoded every --eval-every steps (also eval's default data)"),
    "eval_split": ("", "LibriSpeech split of --eval-data"),
    "eval_every": (0, "steps between validations on --eval-data (0: at every checkpoint)"),
    # model
    "hidden_size": (256, "encoder LSTM width"),
    "num_layers": (2, "encoder LSTM layers"),
    "cheap": ("sparse", "cheap branch"),
    "force": (None, "full: the dense baseline (no arbitrator); cheap: the cheap branch only; none: the "
                    "arbitrator decides"),
    "sparsity": (0.8, "fraction of blocks the sparse branch drops"),
    "block_size": (32, "block edge of the sparse branch"),
    "rank": (32, "rank of the low-rank branch"),
    "arbitrator_hidden": (32, "arbitrator hidden width"),
    "init_p_full": (0.5, "p_full of the untrained arbitrator"),
    "threshold": (0.5, "inference decides full when p_full > threshold"),
    "stack": (3, "frames stacked per encoder step (and its stride)"),
    "pred_hidden": (128, "prediction network width"),
    "joint_hidden": (128, "joint network width"),
    # decoding (eval; validation decodes greedily)
    "beam": (1, "beam width (1: greedy decoding)"),
    # A 30 ms frame holds well under one character of speech; the cap bounds what a poor model emits.
    "max_symbols": (3, "labels emitted per encoder frame at most"),
    # training
    "steps": (1000, "optimizer steps in all (a resumed run continues up to this)"),
    "batch_size": (8, "utterances per step per process"),
    "lr": (2e-3, "AdamW learning rate"),
    "weight_decay": (0.01, "AdamW weight decay"),
    "grad_clip": (5.0, "max gradient norm (0: no clipping)"),
    "tau0": (2.0, "Gumbel-sigmoid temperature at step 0"),
    "tau_min": (0.5, "Gumbel-sigmoid temperature from step anneal_steps - 1 on"),
    "anneal_steps": (0, "steps of the temperature anneal (0: the first run's --steps; kept on --resume)"),
    # The RNN-T term is a sum over an utterance's frames (hundreds of nats at first) while the cost fraction
    # is a mean in [0, 1]: a weight of O(10) is what makes the penalty felt.
    "cost_weight": (10.0, "weight of the compute-cost penalty"),
    "budget": (None, "penalise only the cost fraction above this (0..1); none: all of it"),
    "seed": (0, "seed of initialisation, data order and Gumbel noise"),
    "checkpoint_dir": ("checkpoints", "where checkpoints, config.json and log.csv go"),
    "checkpoint_every": (100, "steps between checkpoints (one is always written at the end)"),
    "average_last": (0, "keep the last K checkpoints (step-N.pt); averaged.pt, their mean, at the end"),
    "save_every_rank": (False, "every rank also writes last.rank<r>.pt (to compare ranks)"),
    "log_every": (50, "steps between logged lines (and log.csv rows)"),
    "threads": (0, "torch threads per process (0: torch's default)"),
    "progress": (True, "tqdm progress bar (on a terminal)"),
}
NULLABLE = {"force": str, "budget": float}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
CHOICES = {"cheap": CHEAP_KINDS, "force": FORCE_KINDS}
MODEL_KEYS = ("hidden_size", "num_layers", "cheap", "force", "sparsity", "block_size", "rank",
              "arbitrator_hidden", "init_p_full", "threshold", "stack", "pred_hidden", "joint_hidden")
TRAIN_KEYS = ("steps", "batch_size", "lr", "weight_decay", "grad_clip", "tau0", "tau_min", "anneal_steps",
              "cost_weight", "budget", "seed", "checkpoint_dir", "checkpoint_every", "average_last",
              "save_every_rank", "log_every", "threads", "progress")
# The flags (and --config keys) of each command. eval takes the model from the checkpoint and applies only
# how it decides (threshold, force); the demo makes its own corpus and checkpoint directories.
COMMAND_KEYS = {
    "train": ("data", "split", "eval_data", "eval_split", "eval_every") + MODEL_KEYS + TRAIN_KEYS
             + ("max_symbols",),
    "eval": ("data", "split", "threshold", "force", "beam", "max_symbols", "threads"),
    # cheap: each demo model sets its own
    "demo": tuple(k for k in MODEL_KEYS if k != "cheap")
            + tuple(k for k in TRAIN_KEYS if k not in ("checkpoint_dir", "average_last", "save_every_rank"))
            + ("max_symbols",),
}


EVAL_FROM_CHECKPOINT = ("threshold", "force", "max_symbols")  # eval's defaults that a checkpoint sets
EVAL_HINT = "; eval takes the model and training settings from the checkpoint"
# The model keys that made the checkpoint's weights (shapes, mask, initialisation): a resumed run loads those
# weights, so it cannot change them; how the encoder decides (threshold, force) it can.
FIXED_BY_CHECKPOINT = tuple(k for k in MODEL_KEYS if k not in EVAL_FROM_CHECKPOINT)


class UsageError(Exception):
    """A mistake in what the user gave: reported in one line (main), no traceback."""


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss, gradient or weight and stopped (no bad checkpoint written)."""


def defaults() -> dict:
    return {key: default for key, (default, _) in CONFIG.items()}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")
    return low in ("true", "1", "yes")


def _means_none(text: str) -> bool:
    """How a flag or a config file (TOML has no null) spells None for a NULLABLE key."""
    return text.lower() in ("none", "")


def _value_type(key: str):
    default = CONFIG[key][0]
    if key in NULLABLE:
        kind = NULLABLE[key]
        parse = lambda text: None if _means_none(text) else kind(text)  # noqa: E731
    else:
        parse = _parse_bool if isinstance(default, bool) else type(default)
    if key not in CHOICES:
        return parse

    def choice(text: str):
        value = parse(text)
        if value not in CHOICES[key]:
            raise argparse.ArgumentTypeError(f"expected one of {_shown_choices(key)}; got {text!r}")
        return value
    return choice


def _shown_choices(key: str) -> str:
    return "{" + ",".join(str(k).lower() for k in CHOICES[key]) + "}"


def load_config_file(path: str, command: str) -> dict:
    """A flat JSON or TOML table (by extension: .json, else TOML) of the command's CONFIG keys."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            got = json.load(f) if path.endswith(".json") else tomllib.load(f)
        except ValueError as exc:  # JSONDecodeError, TOMLDecodeError
            raise UsageError(f"config file {path}: {exc}") from exc
    if not isinstance(got, dict):  # JSON's null, a list, a string: its items are no keys
        raise UsageError(f"config file {path}: must hold a table of settings (a JSON object, e.g. "
                         f'{{"hidden_size": 64}}); got {type(got).__name__}')
    keys = COMMAND_KEYS[command]
    unknown = sorted(set(got) - set(CONFIG))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}; known: {sorted(keys)}")
    # Another command's keys, e.g. the config.json train writes given to eval: say whose, not "unknown".
    others = sorted(set(got) - set(keys))
    if others:
        whose = [c for c, ks in COMMAND_KEYS.items() if c != command and set(others) <= set(ks)]
        raise ValueError(f"config file {path}: {others} are not {command} keys"
                         + (f" but {' and '.join(whose)} keys" if whose else "")
                         + (EVAL_HINT if command == "eval" else "") + f"; {command} keys: {sorted(keys)}")
    return {k: None if k in NULLABLE and isinstance(v, str) and _means_none(v) else v for k, v in got.items()}


def check_config(cfg: dict) -> dict:
    """Types and ranges of the configuration; errors name the key."""
    for key, value in cfg.items():
        default = CONFIG[key][0]
        if value is None and key in NULLABLE:
            continue
        want = NULLABLE.get(key, type(default))
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            cfg[key], ok = float(value), True
        if not ok:
            raise ValueError(f"config: {key} must be {TYPE_NAMES[want]}; got {value!r}")
    for key, kinds in CHOICES.items():
        if cfg[key] not in kinds:
            raise ValueError(f"config: {key} must be one of {kinds}; got {cfg[key]!r}")
    if cfg["budget"] is not None and not 0.0 <= cfg["budget"] <= 1.0:
        raise ValueError(f"config: budget must be none or in [0, 1]; got {cfg['budget']!r}")
    positive = ("hidden_size", "num_layers", "block_size", "rank", "arbitrator_hidden", "stack",
                "pred_hidden", "joint_hidden", "steps", "batch_size", "checkpoint_every", "log_every",
                "beam", "max_symbols")
    for key in positive:
        if cfg[key] < 1:
            raise ValueError(f"config: {key} must be >= 1; got {cfg[key]!r}")
    for key in ("lr", "tau0", "tau_min"):
        if not 0 < cfg[key] < math.inf:
            raise ValueError(f"config: {key} must be a finite number > 0; got {cfg[key]!r}")
    # < inf also refuses nan (every comparison with it is false): a nan or inf weight, clip or decay only
    # shows up as a diverged run.
    for key in ("weight_decay", "grad_clip", "cost_weight", "threads", "eval_every", "anneal_steps",
                "average_last"):
        if not 0 <= cfg[key] < math.inf:
            raise ValueError(f"config: {key} must be a finite number >= 0; got {cfg[key]!r}")
    # What torch takes (torch.manual_seed: an int64 or uint64; set_num_threads: a C int), named here
    # instead of an "Overflow when unpacking long" from the call.
    for key, low, high, bounds in (("seed", -2**63, 2**64 - 1, "[-2**63, 2**64 - 1]"),
                                   ("threads", 0, 2**31 - 1, "[0, 2**31 - 1]")):
        if not low <= cfg[key] <= high:
            raise ValueError(f"config: {key} must be in {bounds}; got {cfg[key]!r}")
    if not 0.0 <= cfg["threshold"] <= 1.0:
        raise ValueError(f"config: threshold must be in [0, 1]; got {cfg['threshold']!r}")
    if not 0.0 <= cfg["sparsity"] < 1.0:
        raise ValueError(f"config: sparsity must be in [0, 1); got {cfg['sparsity']!r}")
    if not 0.0 < cfg["init_p_full"] < 1.0:
        raise ValueError(f"config: init_p_full must be in (0, 1); got {cfg['init_p_full']!r}")
    return cfg


# ---------------------------------------------------------------------------------------------------
# metrics


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions cost 1)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def error_rate(refs: list[str], hyps: list[str], unit: str) -> float:
    """WER (unit="word") or CER (unit="char"): total edit distance / total reference length."""
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"error_rate: need as many hypotheses as references (>= 1); got {len(refs)} "
                         f"references, {len(hyps)} hypotheses")
    if unit not in ("word", "char"):  # "words" was a CER
        raise ValueError(f"error_rate: unit must be 'word' or 'char'; got {unit!r}")
    split = str.split if unit == "word" else list
    total = sum(len(split(r)) for r in refs)
    if total == 0:
        raise ValueError("error_rate: the references are empty")
    return sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps)) / total


# ---------------------------------------------------------------------------------------------------
# building blocks


def load_items(data: str, split: str, what: str = "--data", hint: str = "",
               split_flag: str = "--split") -> list[tuple[str, str]]:
    """what: where data came from (a flag, a checkpoint), as errors name it; hint: what to do instead;
    split_flag: the flag that gives its LibriSpeech split."""
    if not data:
        raise UsageError(f"{what} is required: an espeak-ng corpus directory or a LibriSpeech root")
    if not os.path.isdir(data):
        raise UsageError(f"{what}: no such directory: {data}{hint}")
    if not split and not os.path.isfile(os.path.join(data, TRANSCRIPTS)):
        subdirs = sorted(n for n in os.listdir(data) if os.path.isdir(os.path.join(data, n)))
        raise UsageError(f"{what}: {data} has no {TRANSCRIPTS}, so it is no corpus directory (amnets "
                         f"corpus); a LibriSpeech root needs {split_flag}"
                         + (f" (it holds {', '.join(subdirs[:4])}{', ...' if len(subdirs) > 4 else ''})"
                            if subdirs else ""))
    try:
        return librispeech_items(data, split) if split else corpus_items(data)
    except ValueError as exc:  # which of the run's data sets it is
        raise UsageError(f"{what}: {exc}") from exc


def writable_dir(path: str, what: str, create: bool = True) -> str:
    """path, created if need be, once a file could be made in it: checked before the work that fills it.
    create=False: only checked (the directory it would be made in is writable), nothing is created."""
    probe = path if create else os.path.abspath(path)
    if not create:  # the nearest existing directory on the way
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(probe):
            raise NotADirectoryError(f"{probe} is not a directory")
        tempfile.TemporaryFile(dir=probe).close()  # as root os.access says yes even on a read-only mount
    except OSError as exc:
        raise UsageError(f"{what}: cannot write to {path} ({exc.strerror or exc})") from exc
    return path


def build_model(cfg: dict, vocab_size: int) -> AmNetsRNNT:
    """The configured model; a cheap branch that saves nothing, which the encoder only warns of (a
    NotCheaperWarning: a sparse branch keeping no block or every block, a --rank at which a layer's
    low-rank branch costs no fewer MACs than its full one), is refused: a run would train a useless branch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCheaperWarning)
        try:
            return AmNetsRNNT(80, vocab_size, **{k: cfg[k] for k in MODEL_KEYS})
        except NotCheaperWarning as exc:
            raise ValueError(str(exc)) from None


def temperature(cfg: dict, step: int) -> float:
    """Exponential anneal: tau0 at step 0, tau_min at step anneal_steps - 1 (0: steps - 1) and after."""
    horizon = cfg.get("anneal_steps") or cfg["steps"]
    if horizon <= 1:  # step 0 is step anneal_steps - 1 already
        return cfg["tau_min"]
    progress = step / (horizon - 1)
    return cfg["tau0"] * (cfg["tau_min"] / cfg["tau0"]) ** min(progress, 1.0)


def _noise_seed(seed: int, rank: int, step: int) -> int:
    """The Gumbel noise seed of one step: a function of the step, so that a resumed run draws the same
    noise an uninterrupted one would; distinct per rank."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


BUCKET = 16  # batches per window sorted by length


def batches(lengths: list[float], cfg: dict, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of dataset indices for one epoch: DistributedSampler's shuffled share (every
    rank the same number), sorted by length in windows of BUCKET batches (the encoder steps to the longest
    utterance of a batch: less padding, less time), batch order shuffled again; all from seed and epoch."""
    sampler = torch.utils.data.DistributedSampler(range(len(lengths)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=cfg["seed"])
    sampler.set_epoch(epoch)  # a new order every epoch, the same on every rank
    order, bs = list(sampler), cfg["batch_size"]
    window = BUCKET * bs
    order = [i for w in range(0, len(order), window)
             for i in sorted(order[w:w + window], key=lengths.__getitem__)]
    out = [order[i:i + bs] for i in range(0, len(order), bs)]
    random.Random(cfg["seed"] * 1_000_003 + epoch * 101 + rank).shuffle(out)
    return out


def parameter_counts(model: AmNetsRNNT) -> dict:
    """Parameters by part: encoder full-branch LSTM, cheap-branch factors (low-rank only: the sparse branch
    reuses the full weights), arbitrator, prediction network (embedding, LSTM, projection), joint."""
    parts = dict(encoder_lstm=0, cheap_factors=0, arbitrator=0, prediction=0, joint=0)
    for name, p in model.named_parameters():
        part = ("arbitrator" if name.startswith("encoder.arbitrator.") else
                "cheap_factors" if name.startswith("encoder.w_") else
                "encoder_lstm" if name.startswith("encoder.") else
                "joint" if name.startswith(("enc_proj.", "out.")) else "prediction")
        parts[part] += p.numel()
    return dict(total=sum(parts.values()), **parts)


def _save(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by train (model, config, step; optimizer except in averaged.pt)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give a checkpoint in it, e.g. "
                         f"{os.path.join(path, 'last.pt')} or {os.path.join(path, 'best.pt')}")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        # weights_only: unpickling anything else could run code; train writes tensors and plain values only
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or torch errors: all say "not a checkpoint"
        found = re.search(r"Unsupported global: GLOBAL \S+", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise UsageError(f"{path} is not an amnets checkpoint: it holds pickled Python objects, which "
                             f"are not loaded (unpickling them could run code); {found[0]}") from exc
        # Any other bytes (a text file, noise) fail in the same unpickler: its own reason, not its advice.
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise UsageError(f"{path} is not a checkpoint torch.load can read ("
                         + (reason[1].strip() if reason else f"{type(exc).__name__}: {exc}") + ")") from exc
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise UsageError(f"{path} is not an amnets checkpoint (no model, config and step)")
    kinds = (type(ckpt["model"]), type(ckpt["config"]), type(ckpt["step"]))
    if not (issubclass(kinds[0], dict) and issubclass(kinds[1], dict) and issubclass(kinds[2], int)):
        raise UsageError(f"{path} is not an amnets checkpoint (its model, config and step must be a dict, a "
                         f"dict and an int; got {', '.join(k.__name__ for k in kinds)})")
    best = ckpt.get("best")  # train's best validation record so far, which a resumed run compares against
    numeric = (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool))
    if best is not None and not (isinstance(best, dict) and all(numeric(best.get(k)) for k in ("wer", "cer", "step"))):
        raise UsageError(f"{path} is not an amnets checkpoint (its best record must be none or a dict of wer, cer "
                         f"and step numbers; got {best!r:.80})")
    return ckpt


def checkpoint_config(ckpt: dict, source: str = "the checkpoint") -> dict:
    """The run's configuration, completed with today's defaults for keys added since it was written; the
    anneal horizon of a checkpoint written before anneal_steps existed is the steps it was trained for.
    source: the checkpoint's path, as errors name it."""
    saved = {k: v for k, v in ckpt["config"].items() if k in CONFIG}
    saved["anneal_steps"] = saved.get("anneal_steps") or saved.get("steps", CONFIG["steps"][0])
    try:
        return check_config(dict(defaults(), **saved))
    except ValueError as exc:
        raise UsageError(f"{source}: its {exc}") from exc


def load_weights(model: AmNetsRNNT, ckpt: dict, source: str = "the checkpoint") -> None:
    """The checkpoint's weights into model, which its config built; a mismatch (an edited or foreign
    checkpoint) is one line naming source and the first differences, not load_state_dict's report."""
    state, own = ckpt["model"], model.state_dict()
    wrong = [f"{k} {_shape_or_type(state[k])} where the model has {tuple(v.shape)}" for k, v in own.items()
             if k in state and not (isinstance(state[k], torch.Tensor) and state[k].shape == v.shape)]
    problems = [f"{what}: {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                for what, keys in (
        ("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
        ("mismatched", wrong)) if keys]
    if problems:
        raise UsageError(f"{source}: its weights do not fit the model its config describes ("
                         + "; ".join(problems) + ")")
    # train never saves them (a non-finite step stops it first); decoding them would give empty hypotheses
    bad = [k for k in own if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise UsageError(f"{source}: its weights hold NaN or inf ({', '.join(bad[:3])}"
                         + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") + ")")
    with warnings.catch_warnings():  # its block masks as build_model's: a branch that saves nothing is refused
        warnings.simplefilter("error", NotCheaperWarning)
        try:
            model.load_state_dict(state)
        except NotCheaperWarning as exc:
            raise UsageError(f"{source}: {exc}") from None


def _shape_or_type(value) -> str:
    """A checkpoint entry as load_weights' errors describe it: a tensor's shape, else its type."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"(a {type(value).__name__})"


def check_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, source: str) -> None:
    """The loaded optimizer state's per-parameter tensors (AdamW's exp_avg, exp_avg_sq) in their parameter's
    shape: load_state_dict takes any, and an edited checkpoint's would fail at the first step."""
    names = {p: name for name, p in model.named_parameters()}
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            if key == "step":  # a count, 0-dim
                fits = isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) \
                    and (not isinstance(value, torch.Tensor) or value.numel() == 1)
            else:
                fits = isinstance(value, torch.Tensor) and value.shape == param.shape
            if not fits:
                got = _shape_or_type(value) if key != "step" else repr(value)
                raise UsageError(f"{source}: its optimizer state does not fit its model ({key} of "
                                 f"{names.get(param, 'a parameter')} is {got} where the parameter has "
                                 f"{tuple(param.shape)})")


def model_from_checkpoint(ckpt: dict, source: str = "the checkpoint") -> tuple[AmNetsRNNT, dict]:
    """The checkpoint's model (eval mode) and its configuration; source: its path, as errors name it."""
    cfg = checkpoint_config(ckpt, source)
    try:
        model = build_model(cfg, CharTokenizer().vocab_size)
    except ValueError as exc:  # a config check_config passes that build_model refuses (no kept block)
        raise UsageError(f"{source}: {exc}") from exc
    load_weights(model, ckpt, source)
    return model.eval(), cfg


def load_checkpoint(path: str) -> tuple[AmNetsRNNT, dict]:
    return model_from_checkpoint(read_checkpoint(path), path)


def _log(message: str) -> None:
    """A log line on stderr through tqdm, so that it never lands inside a progress bar."""
    tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# decoding and metrics of a dataset


def utterance_id(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


@torch.no_grad()
def decode_utterances(model: AmNetsRNNT, dataset: SpeechDataset, beam: int = 1,
                      max_symbols: int = CONFIG["max_symbols"][0], batch_size: int = 16) -> list[dict]:
    """Decode every utterance (greedy for beam 1, else beam search): one record per utterance with its
    id, reference, hypothesis, word and character errors, encoder frames and realized cost (fraction of
    the frames on the full branch, per layer with per-layer decisions; MACs per frame the encoder spent)."""
    model.eval()
    rows = []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        feats, feat_lens, _, _ = collate([dataset[i] for i in idx])
        decode = (model.greedy_decode(feats, feat_lens, max_symbols, return_decisions=True) if beam == 1 else
                  model.beam_decode(feats, feat_lens, beam, max_symbols, return_decisions=True))
        labels, decisions, enc_lens = decode
        per_frame = decisions.reshape(*decisions.shape[:2], -1).float().mean(-1)
        macs = model.encoder.realized_macs(decisions)
        for b, i in enumerate(idx):
            path, text = dataset.items[i]
            ref, hyp, n = text.lower(), dataset.tokenizer.decode(labels[b]), int(enc_lens[b])
            words, chars = edit_distance(ref.split(), hyp.split()), edit_distance(ref, hyp)
            rows.append(dict(id=utterance_id(path), ref=ref, hyp=hyp, wer=words / len(ref.split()),
                             cer=chars / len(ref), word_errors=words, words=len(ref.split()),
                             char_errors=chars, chars=len(ref), frames=n,
                             full_fraction=float(per_frame[b, :n].mean()),
                             macs_per_frame=float(macs[b, :n].mean())))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Corpus-level WER and CER (total errors / total reference length) and frame-weighted costs."""
    total = {k: sum(r[k] for r in rows) for k in ("word_errors", "words", "char_errors", "chars", "frames")}
    if total["words"] == 0:
        raise ValueError("the references are empty")
    return dict(wer=total["word_errors"] / total["words"], cer=total["char_errors"] / total["chars"],
                full_fraction=sum(r["full_fraction"] * r["frames"] for r in rows) / total["frames"],
                macs_per_frame=sum(r["macs_per_frame"] * r["frames"] for r in rows) / total["frames"],
                utterances=len(rows))


def evaluate(model: AmNetsRNNT, dataset: SpeechDataset, batch_size: int = 16, beam: int = 1,
             max_symbols: int = CONFIG["max_symbols"][0]) -> dict:
    """WER, CER, full-branch fraction, MACs per frame and utterance count of a dataset, and an example
    (reference, hypothesis)."""
    rows = decode_utterances(model, dataset, beam, max_symbols, batch_size)
    return dict(summarize(rows), example=(rows[0]["ref"], rows[0]["hyp"]))


# ---------------------------------------------------------------------------------------------------
# training


def _env_int(name: str, default: int) -> int:
    """An integer environment variable torchrun sets (WORLD_SIZE, RANK), named when it is not one."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"the environment variable {name} must be an integer (torchrun sets it); got {value!r}") \
            from None


def train(cfg: dict, resume: str | None = None, dataset: SpeechDataset | None = None,
          announce: bool = True, replace: bool = False) -> tuple[AmNetsRNNT, dict]:
    """Train as configured; under torchrun (WORLD_SIZE > 1) data-parallel. dataset: what to train on
    instead of cfg's data; announce: log the configuration and model size first; replace: checkpoint_dir
    is the caller's own output (the demo's), whose earlier checkpoints are replaced, not refused.
    Returns (model, the last step's stats)."""
    world = _env_int("WORLD_SIZE", 1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # the model trains on the CPU
    rank = dist.get_rank() if world > 1 else 0
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ckpt = read_checkpoint(resume) if resume else None
    if ckpt is not None and "optimizer" not in ckpt:
        raise UsageError(f"{resume} holds no optimizer state (an averaged checkpoint?); resume from last.pt")
    if ckpt is not None and ckpt["step"] > cfg["steps"]:  # it would log nothing and rewrite config.json
        raise UsageError(f"--resume {resume} is at step {ckpt['step']}, past --steps {cfg['steps']} (the "
                         f"steps in all, not more steps); give --steps above {ckpt['step']} to train on")
    # The anneal horizon is fixed by the first run and kept on --resume: a run extended past it stays at
    # tau_min instead of jumping back up a schedule recomputed over the new --steps. config.json keeps the
    # value as given (0: a later run's own --steps).
    anneal_given = cfg["anneal_steps"]
    cfg = dict(cfg, anneal_steps=cfg["anneal_steps"] or cfg["steps"])
    for key in ("data", "eval_data", "checkpoint_dir"):  # a checkpoint's paths work from any directory
        cfg[key] = cfg[key] and os.path.abspath(cfg[key])
    # Everything that can be refused without the data is checked before it loads (minutes, on LibriSpeech).
    writable_dir(cfg["checkpoint_dir"], "--checkpoint-dir", create=False)
    if not replace:
        _refuse_another_runs_checkpoints(cfg["checkpoint_dir"], resume)
    tokenizer = CharTokenizer()
    torch.manual_seed(cfg["seed"])  # the same initial model on every rank (DDP also broadcasts it)
    model = build_model(cfg, tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, best = 0, None
    if ckpt is not None:
        load_weights(model, ckpt, resume)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:  # torch's words, without the file
            raise UsageError(f"{resume}: its optimizer state does not fit its model ({exc})") from exc
        check_optimizer_state(optimizer, model, resume)
        for group in optimizer.param_groups:  # the run's own --lr / --weight-decay, not the saved ones
            group["lr"], group["weight_decay"] = cfg["lr"], cfg["weight_decay"]
        step, best = ckpt["step"], _best_so_far(cfg, ckpt)
    if dataset is None:
        dataset = SpeechDataset(load_items(cfg["data"], cfg["split"]), tokenizer)
    valid = None
    if rank == 0 and cfg["eval_data"]:
        valid = SpeechDataset(load_items(cfg["eval_data"], cfg["eval_split"], "--eval-data",
                                         split_flag="--eval-split"), tokenizer)
    os.makedirs(cfg["checkpoint_dir"], exist_ok=True)
    if rank == 0:
        _announce(cfg, model, dataset, valid, resume, step, announce, anneal_given)
        if ckpt is not None and ckpt.get("world", world) != world:  # (checkpoints before 2026-12-02: unknown)
            _log(f"amnets train: note: {resume} was trained on {ckpt['world']} process(es), this run on {world}: "
                 f"the global batch becomes {world} x batch_size and the data order from here is not that of "
                 f"an uninterrupted run (resume on {ckpt['world']} to continue exactly)"
                 + ("; last.rank<r>.pt of ranks past this run's are the earlier run's"
                    if cfg["save_every_rank"] and ckpt["world"] > world else ""))
        if step >= cfg["steps"]:
            _log(f"amnets train: the checkpoint is at step {step}, --steps {cfg['steps']}: nothing to train")
    # A forced encoder never runs its arbitrator (and the dense baseline never its cheap factors).
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg["force"] is not None) \
        if world > 1 else model
    lengths = [dataset.duration(i) for i in range(len(dataset))]
    n_batches = len(batches(lengths, cfg, 0, rank, world))
    bar = tqdm(total=cfg["steps"], initial=step, disable=True if rank or not cfg["progress"] else None,
               file=sys.stderr, dynamic_ncols=True)  # disable=None: a bar only on a terminal
    checkpoints = _Checkpoints(cfg, rank)
    csv_log = _CsvLog(os.path.join(cfg["checkpoint_dir"], "log.csv"), step) if rank == 0 else None
    eval_every = cfg["eval_every"] or cfg["checkpoint_every"]
    stats: dict = {}
    started = time.time()
    model.train()
    while step < cfg["steps"]:
        epoch, skip = divmod(step, n_batches)
        for batch in batches(lengths, cfg, epoch, rank, world)[skip:]:
            if step >= cfg["steps"]:
                break
            model.encoder.tau = temperature(cfg, step)
            torch.manual_seed(_noise_seed(cfg["seed"], rank, step))
            loss, stats = ddp(*collate([dataset[i] for i in batch]), cost_weight=cfg["cost_weight"],
                              budget=cfg["budget"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The norm of the (all-reduced, so on every rank the same) gradient: clipped when configured,
            # and a non-finite one stops every rank at the same step, before it reaches the weights.
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or math.inf))
            if not (math.isfinite(loss.item()) and math.isfinite(norm)):
                checkpoints.discard()
                raise TrainingDiverged(f"the loss or its gradient became non-finite at step {step + 1} (loss "
                                       f"{loss.item():.4g}, gradient norm {norm:.4g}); stopped, and "
                                       f"{checkpoints.kept()}. {_lower_lr(cfg)}")
            checkpoints.confirm()  # the weights of the pending checkpoints gave a finite loss and gradient
            optimizer.step()
            step += 1
            final = step == cfg["steps"]
            stats = dict(stats, tau=model.encoder.tau, lr=cfg["lr"], grad_norm=norm, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", full=f"{stats['full_fraction']:.2f}",
                            tau=f"{stats['tau']:.2f}")
            row = None
            if rank == 0 and (step % cfg["log_every"] == 0 or final):
                _log(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "step"))
                row = dict(stats)
            improved = False
            if valid is not None and (step % eval_every == 0 or final):
                result = evaluate(model, valid, max_symbols=cfg["max_symbols"])
                model.train()
                record = {k: result[k] for k in ("wer", "cer", "full_fraction")} | dict(step=step)
                improved = best is None or (record["wer"], record["cer"]) < (best["wer"], best["cer"])
                best = record if improved else best
                mark = ("best so far: best.pt" if improved
                        else f"best: WER {best['wer']:.4f} at step {best['step']}")
                _log(f"step {step} validation: WER {record['wer']:.4f} CER {record['cer']:.4f} full fraction "
                     f"{record['full_fraction']:.3f} ({mark})")
                row = dict(row or stats, val_wer=record["wer"], val_cer=record["cer"],
                           val_full_fraction=record["full_fraction"])
            if row is not None:
                csv_log.write(dict(row, step=step, elapsed_s=time.time() - started))
            if step % cfg["checkpoint_every"] == 0 or final or improved:
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    checkpoints.discard()
                    raise TrainingDiverged(f"a weight became non-finite at step {step}; stopped, and "
                                           f"{checkpoints.kept()}. {_lower_lr(cfg)}")
                names = ["best.pt"] if improved else []
                if step % cfg["checkpoint_every"] == 0 or final:
                    names += ["last.pt"] + ([f"step-{step}.pt"] if cfg["average_last"] else [])
                payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                               config=cfg, tau=model.encoder.tau, best=best, world=world)
                checkpoints.write(payload, names, final)
    bar.close()
    if rank == 0 and cfg["average_last"] and step == cfg["steps"]:
        _log(average_checkpoints(cfg["checkpoint_dir"], cfg["average_last"]))
    if world > 1:
        dist.barrier()  # rank 0's checkpoints are complete before any rank returns
    return model, stats


# A run's own checkpoints besides step-<N>.pt (the names _Checkpoints and average_checkpoints write).
RUN_CHECKPOINTS = ("last.pt", "best.pt", "averaged.pt")


def _refuse_another_runs_checkpoints(directory: str, resume: str | None) -> None:
    """Checkpoints carry no run identity: a new run would overwrite another's last.pt and best.pt, prune its
    own (lower-numbered) step-<N>.pt and average the old run's. Only --resume continues the run they
    belong to, in the directory of its checkpoint."""
    if not os.path.isdir(directory) or (
            resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)), directory)):
        return
    advice = (f"continue that run with --resume {os.path.join(directory, 'last.pt')}, or choose another "
              f"--checkpoint-dir")
    old = [os.path.basename(p) for p in numbered_checkpoints(directory)]
    if old:
        raise UsageError(f"--checkpoint-dir {directory} holds step-<N>.pt checkpoints of another run "
                         f"({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}), which --average-last "
                         f"would mix with this run's; {advice}")
    taken = [name for name in RUN_CHECKPOINTS if os.path.exists(os.path.join(directory, name))]
    taken += sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "last.rank*.pt")))
    if taken:
        raise UsageError(f"--checkpoint-dir {directory} holds another run's {', '.join(taken)}, which this "
                         f"run would overwrite; {advice}")


def _best_so_far(cfg: dict, ckpt: dict) -> dict | None:
    """The best validation record a resumed run starts from: its checkpoint's, or best.pt's in the checkpoint
    directory when better (written after that checkpoint, by steps this run redoes, which may come out
    otherwise). Only records of this run's validation data count: WERs on other data do not compare."""
    def same_data(conf: dict) -> bool:
        return (conf.get("eval_data"), conf.get("eval_split")) == (cfg["eval_data"], cfg["eval_split"])

    records = [ckpt.get("best")] if same_data(ckpt["config"]) else []
    path = os.path.join(cfg["checkpoint_dir"], "best.pt")
    if os.path.isfile(path):
        try:
            on_disk = read_checkpoint(path)
        except UsageError:  # unreadable: the checkpoint's record stands, and the next best overwrites it
            on_disk = None
        if on_disk is not None and same_data(on_disk["config"]):
            records.append(on_disk.get("best"))
    return min((r for r in records if r), key=lambda r: (r["wer"], r["cer"]), default=None)


def _lower_lr(cfg: dict) -> str:
    return f"Lower --lr (now {cfg['lr']:g}) or set --grad-clip."


def _announce(cfg: dict, model: AmNetsRNNT, dataset, valid, resume: str | None, step: int,
              show: bool, anneal_given: int) -> None:
    """The configuration (also written to config.json, a --config file for a later run) and the model's
    size, before anything else is logged."""
    with open(os.path.join(cfg["checkpoint_dir"], "config.json"), "w") as f:
        json.dump({k: cfg[k] for k in COMMAND_KEYS["train"]} | {"anneal_steps": anneal_given}, f, indent=1)
    if not show:
        return
    shown = " ".join(f"{k}={cfg[k]!r}" for k in COMMAND_KEYS["train"])
    _log("amnets train: config\n" + textwrap.fill(shown, 110, initial_indent="  ", subsequent_indent="  "))
    counts = parameter_counts(model)
    parts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items() if k != "total" and v)
    enc = model.encoder
    _log(f"amnets train: {counts['total']:,} parameters ({parts}); encoder MACs per frame: full "
         f"{enc.macs_per_frame('full'):,}, cheap {enc.macs_per_frame('cheap'):,}")
    _log(f"amnets train: {len(dataset)} training utterances"
         + (f", {len(valid)} validation utterances" if valid is not None else ", no validation (--eval-data)")
         + (f"; resumed from {resume} at step {step}" if resume else "")
         + f"; writing to {cfg['checkpoint_dir']}")


class _Checkpoints:
    """A rank's checkpoints in checkpoint_dir, each replaced only by weights known to be good.

    Rank 0 writes last.pt, best.pt and step-<N>.pt (kept for --average-last: the last K of them); with
    save_every_rank every rank also writes last.rank<r>.pt. A checkpoint taken during training is written
    beside its target (<name>.pending) and moved into place only once the next step has computed a finite
    loss and gradient from its weights: weights that an optimizer step blew up (finite but huge, then NaN a
    step later) never replace the last good ones. The final checkpoint, with no next step, goes into place
    at once (its weights checked finite).
    """

    def __init__(self, cfg: dict, rank: int):
        self.directory, self.rank, self.keep = cfg["checkpoint_dir"], rank, cfg["average_last"]
        self.every_rank = cfg["save_every_rank"]
        self.pending: list[str] = []
        # Pending files left by a run killed between a checkpoint and its next step were never confirmed.
        for path in glob.glob(os.path.join(self.directory, "*.pending")):
            if self._mine(os.path.basename(path)[:-len(".pending")]):
                os.remove(path)

    def _mine(self, name: str) -> bool:
        return name == f"last.rank{self.rank}.pt" if name.startswith("last.rank") else self.rank == 0

    def write(self, payload: dict, names: list[str], final: bool) -> None:
        if self.every_rank and "last.pt" in names:
            names = [*names, f"last.rank{self.rank}.pt"]
        for name in filter(self._mine, names):
            path = os.path.join(self.directory, name)
            if final:
                _save(path, payload)
            else:
                _save(path + ".pending", payload)
                self.pending.append(path)
        if final:
            self.discard()
            self.prune()

    def confirm(self) -> None:
        for path in self.pending:
            os.replace(path + ".pending", path)
        if self.pending:
            self.pending = []
            self.prune()

    def discard(self) -> None:
        for path in self.pending:
            if os.path.exists(path + ".pending"):
                os.remove(path + ".pending")
        self.pending = []

    def prune(self) -> None:
        """Only the last `keep` step-<N>.pt stay (the ones --average-last averages)."""
        if self.rank == 0 and self.keep:
            for path in numbered_checkpoints(self.directory)[:-self.keep]:
                os.remove(path)

    def kept(self) -> str:
        path = os.path.join(self.directory, "last.pt" if self.rank == 0 else f"last.rank{self.rank}.pt")
        if not os.path.exists(path):
            return f"no checkpoint was written to {self.directory}"
        return f"the last good checkpoint is kept: {path} (step {read_checkpoint(path)['step']})"


def numbered_checkpoints(directory: str) -> list[str]:
    """The step-<N>.pt files of a directory, oldest step first."""
    paths = glob.glob(os.path.join(directory, "step-*.pt"))
    steps = {p: os.path.basename(p)[len("step-"):-len(".pt")] for p in paths}
    return sorted((p for p in paths if steps[p].isdigit()), key=lambda p: int(steps[p]))


def average_checkpoints(directory: str, k: int) -> str:
    """averaged.pt: the element-wise mean of the model weights of the last k step-<N>.pt (icefall's and
    ESPnet's checkpoint averaging); integer and bool buffers (the block masks, fixed at init) are taken from
    the newest. No optimizer state: for eval, not --resume. Returns what it did, in words."""
    paths = numbered_checkpoints(directory)[-k:]
    if not paths:
        return f"average: no step-<N>.pt in {directory}; nothing averaged"
    ckpts = [read_checkpoint(p) for p in paths]
    newest = ckpts[-1]
    model = {name: torch.stack([c["model"][name] for c in ckpts]).mean(0) if value.is_floating_point()
             else value for name, value in newest["model"].items()}
    names = [os.path.basename(p) for p in paths]
    _save(os.path.join(directory, "averaged.pt"),
          dict(model=model, step=newest["step"], config=newest["config"], averaged_from=names))
    short = f" (only {len(paths)} saved)" if len(paths) < k else ""
    return f"averaged.pt: the mean of {', '.join(names)}{short}"


class _CsvLog:
    """log.csv: a row per logged or validated step. A resumed run drops the rows of steps past its
    checkpoint (a killed run logged them; they are redone) and appends."""

    COLUMNS = ("step", "loss", "rnnt", "penalty", "cost_fraction", "p_full", "full_fraction", "tau", "lr",
               "grad_norm", "val_wer", "val_cer", "val_full_fraction", "elapsed_s")

    def __init__(self, path: str, step: int):
        rows = []
        if step and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if r.get("step", "").isdigit() and int(r["step"]) <= step]
        self.path = path
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:  # a few rows a minute: no handle kept open
            csv.DictWriter(f, self.COLUMNS, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


@torch.no_grad()
def stream_frame_costs(models: list[AmNetsRNNT], feats, repeats: int = 3) -> list[list[list[float]]]:
    """Seconds per encoder frame at B=1, one frame per call of the encoder's streamer (AmNetsEncoder.streamer:
    the frame engine, state carried from call to call, as a live stream runs): [model][utterance][frame],
    for feats, a list of (T, 80) tensors.

    The models take turns utterance by utterance, and each frame's cost is the median of `repeats`
    passes, so that a machine whose speed drifts (a shared VM) does not favour the model timed first.
    Frames are cut from the utterance before the clock starts: slicing a tensor in Python costs ~3 us, the
    same for every model, which is the harness's cost, not the encoder's.
    """
    for model in models:
        model.eval()
    runs = [[[] for _ in feats] for _ in models]
    for _ in range(repeats):
        for u, f in enumerate(feats):
            for m, model in enumerate(models):
                x, _ = stack_frames(f[None], torch.tensor([len(f)]), model.stack, model.stack_tail)
                live = model.encoder.streamer()  # a new stream: zero state
                frames = x.split(1, dim=1)  # each frame its own tensor, as a live front end hands them over
                live(frames[0])  # warm-up
                live.reset()
                mine = []
                for frame in frames:
                    start = time.perf_counter()
                    live(frame)
                    mine.append(time.perf_counter() - start)
                runs[m][u].append(mine)
    return [[[statistics.median(frame) for frame in zip(*passes)] for passes in per_utt] for per_utt in runs]


# ---------------------------------------------------------------------------------------------------
# commands


def resolve_config(command: str, args, base: dict | None = None) -> tuple[dict, set]:
    """defaults < base (a checkpoint's config, the demo's settings) < --config file < flags. Returns the
    checked configuration and the keys the user gave (file or flags)."""
    cfg = dict(defaults(), **(base or {}))
    given = load_config_file(args.config, command) if args.config else {}
    given.update({k: v for k, v in vars(args).items() if k in CONFIG})
    cfg.update(given)
    return check_config(cfg), set(given)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _corpus_audio(directory: str) -> set[str]:
    """The audio files of a corpus of ours in directory: only these are removed when it is remade."""
    if not os.path.isfile(os.path.join(directory, TRANSCRIPTS)):  # not recognisably one: nothing is ours
        return set()
    return {os.path.join(directory, n) for n in os.listdir(directory) if CORPUS_AUDIO.fullmatch(n)}


def remake_corpus(directory: str, n_utterances: int, **kwargs) -> list[tuple[str, str]]:
    """make_corpus over whatever directory holds, then the old corpus's audio that the new one did not
    replace is removed (a smaller corpus over a larger one leaves no stray utterances); other files stay."""
    old = _corpus_audio(directory)
    make_corpus(directory, n_utterances, **kwargs)
    with warnings.catch_warnings():  # the unlisted audio is the old corpus's, going now, or not ours
        warnings.simplefilter("ignore", DataWarning)
        items = corpus_items(directory)
    for path in old - {p for p, _ in items}:
        os.remove(path)
    return items


def cmd_corpus(args) -> int:
    # In the flags' words, before make_corpus's (n_utterances, jobs) or the OS's ("File exists")
    if args.utterances < 1:
        raise UsageError(f"--utterances (-n) must be >= 1; got {args.utterances}")
    if args.jobs < 0:
        raise UsageError(f"--jobs must be >= 0 (0: one per CPU); got {args.jobs}")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir} is a file, not a directory; give a new or empty directory for the corpus")
    if os.path.exists(os.path.join(args.dir, TRANSCRIPTS)) and not args.overwrite:
        raise UsageError(f"{args.dir} already holds a corpus ({TRANSCRIPTS}); --overwrite replaces it")
    if os.path.isdir(args.dir) and os.listdir(args.dir) and not args.overwrite:
        raise UsageError(f"{args.dir} is not empty and holds no corpus ({TRANSCRIPTS}); give a new or empty "
                         f"directory, or --overwrite to write the corpus among its files (any named as the "
                         f"corpus's, utt000000.wav ..., are replaced)")
    if shutil.which("espeak-ng") is None:
        raise UsageError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    if not 80 <= args.rate[0] <= args.rate[1] <= 450:  # espeak-ng's -s range
        raise UsageError(f"--rate: MIN MAX words per minute with 80 <= MIN <= MAX <= 450; got {args.rate}")
    voices = tuple(v for v in args.voices.split(",") if v)
    start = time.time()
    items = remake_corpus(args.dir, args.utterances, seed=args.seed, words_per_utterance=tuple(args.words),
                          voices=voices, rates=tuple(args.rate), jobs=args.jobs)
    seconds = sum(SpeechDataset(items, cache=False).duration(i) for i in range(len(items)))
    summary = dict(dir=os.path.abspath(args.dir), utterances=len(items), seed=args.seed,
                   words=sum(len(t.split()) for _, t in items), audio_s=round(seconds, 2))
    print(f"amnets corpus: {summary['utterances']} utterances, {summary['words']} words, "
          f"{seconds / 60:.1f} min of audio in {summary['dir']} ({time.time() - start:.0f} s)",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    base = checkpoint_config(read_checkpoint(args.resume), args.resume) if args.resume else None
    cfg, given = resolve_config("train", args, base)
    if base is not None and "checkpoint_dir" not in given:
        # Beside the checkpoint given, not where the run was when it wrote it: a copied or moved run
        # continues in its new place and leaves the original alone.
        cfg["checkpoint_dir"] = os.path.dirname(os.path.abspath(args.resume))
    if base is not None:
        clash = [k for k in FIXED_BY_CHECKPOINT if k in given and cfg[k] != base[k]]
        if clash:
            raise UsageError(f"--resume {args.resume}: the checkpoint's model fixes " + ", ".join(
                f"{_flag(k)} (the checkpoint: {base[k]!r}; given: {cfg[k]!r})" for k in clash)
                + "; drop them, or train a new model without --resume")
    _, stats = train(cfg, args.resume)
    if _env_int("RANK", 0) == 0:
        keys = ("step", "loss", "rnnt", "full_fraction", "tau")
        print(json.dumps({k: stats[k] for k in keys if k in stats}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def cmd_eval(args) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    model, saved = model_from_checkpoint(ckpt, args.checkpoint)
    # From the checkpoint: how its model decides, and its validation's cap; not its training's --threads.
    cfg, given = resolve_config("eval", args, {k: saved[k] for k in EVAL_FROM_CHECKPOINT})
    # The data: --data, else the checkpoint's validation data, else its training data; --split alone
    # picks another split of the checkpoint's LibriSpeech root.
    if "data" in given:
        data, split = cfg["data"], cfg["split"] if "split" in given else ""
        items = load_items(data, split)
    else:
        source = "eval_" if saved["eval_data"] else ""
        data, split = saved[source + "data"], cfg["split"] if "split" in given else saved[source + "split"]
        if not data:
            raise UsageError(f"{args.checkpoint} names no data (the demo trains on a list of files); "
                             "give --data")
        items = load_items(data, split, f"the checkpoint's {_flag(source + 'data')} (recorded in "
                           f"{args.checkpoint})", "; give --data")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model.encoder.threshold, model.encoder.force = cfg["threshold"], cfg["force"]
    decoding = "greedy" if cfg["beam"] == 1 else f"beam{cfg['beam']}"
    data_name = os.path.basename(os.path.normpath(data)) + (split and "-" + split)
    parts = ["eval", utterance_id(args.checkpoint), data_name, decoding] + (
        [f"force-{cfg['force']}"] if cfg["force"] else [])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "_".join(parts))
    where = "--out" if args.out else "the output directory beside the checkpoint (--out to choose)"
    writable_dir(out, where, create=False)  # made once the data has decoded: a bad file leaves no empty one
    dataset = SpeechDataset(items)
    start = time.time()
    rows = decode_utterances(model, dataset, cfg["beam"], cfg["max_symbols"])
    summary = dict(summarize(rows), checkpoint=os.path.abspath(args.checkpoint), step=ckpt["step"],
                   data=os.path.abspath(data), split=split, beam=cfg["beam"], max_symbols=cfg["max_symbols"],
                   force=cfg["force"], threshold=cfg["threshold"], seconds=round(time.time() - start, 3))
    writable_dir(out, where)
    for name, key in (("hyps.txt", "hyp"), ("refs.txt", "ref")):  # Kaldi/ESPnet text files: "<id> <text>"
        with open(os.path.join(out, name), "w") as f:
            f.writelines(f"{r['id']} {r[key]}\n" for r in rows)
    with open(os.path.join(out, "utterances.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"amnets eval: {len(rows)} utterances, {decoding}: WER {summary['wer']:.4f} CER "
          f"{summary['cer']:.4f}; wrote hyps.txt, refs.txt, utterances.jsonl, summary.json to {out}",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0


# (name, config overrides, multiple of the configured steps). The dense model trains 1.5x the steps: its
# steps cost under half an AmNets step (one branch, no arbitrator) and at 800 it is still improving, so
# the baseline is trained at least as well as the models it is compared with.
DEMO_MODELS = (("dense", dict(cheap="lowrank", force="full", cost_weight=0.0), 1.5),
               ("amnets sparse", dict(cheap="sparse"), 1.0), ("amnets lowrank", dict(cheap="lowrank"), 1.0))
# The tiny demo: seconds (about 7 s on a 2-core CPU), for the test suite; it shows the pipeline runs,
# not that anything is learnt. At lr 1e-2 and 16 steps the models have learnt that blanks dominate
# (empty hypotheses: WER and CER 1.0); at the default lr, 4 steps left them emitting up to the cap of
# labels on every frame (CER near 6 at 5 labels a frame). One thread: a model this small gains nothing
# from more, and on a busy machine a second OpenMP thread waiting for a core made it 3x slower.
TINY = dict(hidden_size=32, num_layers=1, rank=4, block_size=16, pred_hidden=16, joint_hidden=16,
            arbitrator_hidden=8, steps=16, batch_size=4, lr=1e-2, threads=1, checkpoint_every=1000,
            log_every=1000)
# The demo: about 12 minutes in all on a 2-core CPU (dense about 2, each AmNets variant about 4). The
# budget asks the AmNets models for at most half the dense MACs; the dense model has no penalty. At
# lr 3e-3 the dense model trained badly (WER 0.45-0.53 at 800 steps, loss stuck near 15 for 250
# steps); at 1e-3 all three train well.
DEMO = dict(hidden_size=192, num_layers=2, rank=32, block_size=32, steps=800, batch_size=8, lr=1e-3,
            cost_weight=50.0, budget=0.5, checkpoint_every=1000, log_every=100)


DEMO_CORPUS_RECORD = "demo_corpus.json"  # in the demo's corpus directory: what made it


def _demo_corpus(corpus: str, n_utt: int, seed: int) -> list[tuple[str, str]]:
    """The demo's corpus: the one in `corpus` if this demo made it with these parameters, else made anew
    (over one it made with others); a corpus it did not record making is refused, not replaced."""
    record_path = os.path.join(corpus, DEMO_CORPUS_RECORD)
    want = dict(utterances=n_utt, seed=seed)
    made = None
    if os.path.isfile(record_path):
        with open(record_path) as f:
            try:
                made = json.load(f)
            except ValueError:  # cut short or edited: made with unknown parameters
                made = {}
        made = made if isinstance(made, dict) else {}
    if made == want:
        print(f"amnets demo: reusing the corpus in {corpus} (made with the same --utterances {n_utt} and "
              f"--seed {seed})", file=sys.stderr)
        return corpus_items(corpus)
    if made is None and os.path.isdir(corpus) and os.listdir(corpus):
        raise UsageError(f"{corpus} is not a corpus this demo recorded making (no {DEMO_CORPUS_RECORD}); "
                         f"remove it, or choose another --out")
    if made is not None:
        print(f"amnets demo: the corpus in {corpus} was made with --utterances {made.get('utterances')} "
              f"--seed {made.get('seed')}; remaking it with --utterances {n_utt} --seed {seed}",
              file=sys.stderr)
        os.remove(record_path)  # a remake cut short is not taken for a finished one
    items = remake_corpus(corpus, n_utt, seed=seed)
    with open(record_path, "w") as f:
        json.dump(want, f)
    return items


def cmd_demo(args) -> int:
    cfg, _ = resolve_config("demo", args, TINY if args.tiny else DEMO)
    n_utt = args.utterances or (24 if args.tiny else 450)
    n_eval = max(2, n_utt // 5)  # 90 held out by default: WER on ~300 words moved by 0.05 between seeds
    if n_utt <= n_eval:
        raise UsageError(f"--utterances must be at least 3 (a fifth, at least 2, is held out); got {n_utt}")
    if not 1 <= args.stream_threads <= 2**31 - 1:  # checked now, not after minutes of training when timing starts
        raise UsageError(f"--stream-threads must be in [1, 2**31 - 1]; got {args.stream_threads}")
    for _, overrides, _ in DEMO_MODELS:  # a model build_model refuses: now, not after the models before it
        build_model(check_config(dict(cfg, **overrides)), CharTokenizer().vocab_size)
    # A tiny run is a smoke test: by default it leaves nothing in the working directory.
    out = os.path.abspath(args.out or (tempfile.mkdtemp(prefix="amnets-demo-tiny-") if args.tiny
                                       else "amnets_demo"))
    print(f"amnets demo: writing to {out} (corpus/, a checkpoint directory per model, results.json, "
          f"table.txt; --out DIR to choose)", file=sys.stderr)
    corpus = os.path.join(out, "corpus")
    start = time.time()
    items = _demo_corpus(corpus, n_utt, cfg["seed"])
    if len(items) <= n_eval:
        raise UsageError(f"{corpus} holds {len(items)} utterances; need more than {n_eval}")
    # The held-out utterances are the corpus's last ones: make_corpus draws each independently.
    # One dataset for the three models: the features are computed once.
    train_set, eval_set = SpeechDataset(items[:-n_eval]), SpeechDataset(items[-n_eval:])
    print(f"amnets demo: corpus of {len(items)} utterances ({len(items) - n_eval} train, {n_eval} eval) in "
          f"{time.time() - start:.0f} s", file=sys.stderr)
    train_threads, threads = torch.get_num_threads(), args.stream_threads
    rows, models = [], []
    for name, overrides, step_scale in DEMO_MODELS:
        run = check_config(dict(cfg, **overrides, steps=max(1, round(cfg["steps"] * step_scale)),
                                checkpoint_dir=os.path.join(out, name.replace(" ", "_"))))
        torch.set_num_threads(cfg["threads"] or train_threads)
        t0 = time.time()
        model, _ = train(run, dataset=train_set, announce=False, replace=True)
        trained = time.time() - t0
        result = evaluate(model, eval_set, max_symbols=cfg["max_symbols"])
        rows.append(dict(name=name, steps=run["steps"], trained_s=round(trained, 2), **result))
        models.append(model)
        print(f"amnets demo: {name}: trained {run['steps']} steps in {trained:.0f} s; WER "
              f"{result['wer']:.3f}; e.g. {result['example']}", file=sys.stderr)
    torch.set_num_threads(threads)  # streaming is timed with pinned threads, the models taking turns
    all_costs = stream_frame_costs(models, [eval_set[i][0] for i in range(len(eval_set))])
    dense_ms = None
    # The simulated device runs the dense encoder at 1.2x real time; every model's costs get that scale.
    period = 0.01 * cfg["stack"]
    for r, costs in zip(rows, all_costs):
        flat = [c for utt in costs for c in utt]
        dense_ms = dense_ms or 1e3 * sum(flat) / len(flat)  # the first row is the dense model
        scale = 1.2 * period / (dense_ms / 1e3)
        upl = [simulate_latency([c * scale for c in utt], period)["upl"] for utt in costs]
        r.update(frame_ms=1e3 * sum(flat) / len(flat), upl_s=sum(upl) / len(upl))
        r["x_dense"] = r["frame_ms"] / dense_ms
    table = [f"{'model':<16} {'steps':>5} {'WER':>6} {'CER':>6} {'full frac':>9} {'MACs/frame':>11} "
             f"{'stream ms/frame':>15} {'x dense':>7} {'UPL s @1.2xRT':>13}"]
    table += [f"{r['name']:<16} {r['steps']:5d} {r['wer']:6.3f} {r['cer']:6.3f} {r['full_fraction']:9.2f} "
              f"{r['macs_per_frame']:11.0f} {r['frame_ms']:15.3f} {r['x_dense']:7.2f} {r['upl_s']:13.3f}"
              for r in rows]
    total = time.time() - start
    table += ["", f"{len(items) - n_eval} training / {n_eval} eval utterances; stream timed at B=1 with "
                  f"{threads} thread(s); frame period {period * 1e3:.0f} ms (stack {cfg['stack']}); total "
                  f"{total:.0f} s"]
    print("\n" + "\n".join(table))
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write("\n".join(table) + "\n")
    results = dict(tiny=args.tiny, config=cfg, corpus=corpus, train_utterances=len(items) - n_eval,
                   eval_utterances=n_eval, stream_threads=threads, frame_period_ms=period * 1e3,
                   total_s=round(total, 2), models=rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"amnets demo: wrote results.json and table.txt to {out}", file=sys.stderr)
    return 0


COMMANDS = {"corpus": cmd_corpus, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse also prints the usage)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_flags(parser, keys, default_of=lambda key: repr(CONFIG[key][0]), aliases=None,
                  helps=None) -> None:
    """A flag per configuration key (--hidden-size for hidden_size), absent from args unless given."""
    group = parser.add_argument_group("options (also keys of a --config file)")
    group.add_argument("--config", help="JSON or TOML file of these options (flat keys: hidden_size = 64)")
    for key in keys:
        flags = [_flag(key)] + list((aliases or {}).get(key, ()))
        text = (helps or {}).get(key, CONFIG[key][1])
        group.add_argument(*flags, dest=key, type=_value_type(key), default=argparse.SUPPRESS,
                           metavar=_shown_choices(key) if key in CHOICES else None,
                           help=f"{text} (default {default_of(key)})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="amnets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `amnets --debug eval ...` is not undone by the subcommand's default
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the Python traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{corpus,train,eval,demo}")
    parser.commands = {}

    def command(name, text):
        parser.commands[name] = commands.add_parser(name, help=text, description=text, parents=[common])
        return parser.commands[name]

    corpus = command("corpus", "make an espeak-ng corpus directory (WAVs + transcripts.txt)")
    corpus.add_argument("dir", help="the corpus directory (created)")
    corpus.add_argument("-n", "--utterances", type=int, default=450, help="utterances (default 450)")
    corpus.add_argument("--seed", type=int, default=0, help="the same seed gives the same corpus (default "
                        "0); give training and validation corpora different seeds")
    corpus.add_argument("--words", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                        help="words per utterance (default 2 5)")
    corpus.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices, comma-separated "
                        "(`espeak-ng --voices=en` lists them; default %(default)s)")
    corpus.add_argument("--rate", type=int, nargs=2, default=(120, 220), metavar=("MIN", "MAX"),
                        help="speaking rate range, words per minute (default 120 220)")
    corpus.add_argument("--jobs", type=int, default=0,
                        help="espeak-ng processes at once (default 0: one per CPU)")
    corpus.add_argument("--overwrite", action="store_true", help="replace a corpus already in DIR, or write "
                        "into a DIR holding other files (only those named as the corpus's, utt<NNNNNN>.wav, are "
                        "replaced)")

    train_ = command("train", "train a model (checkpoints, validation, log.csv in --checkpoint-dir)")
    train_.add_argument("--resume", help="checkpoint to continue from (its config is the base, its step, "
                        "optimizer and temperature schedule carry on)")
    _config_flags(train_, COMMAND_KEYS["train"],
                  helps=dict(max_symbols="validation: " + CONFIG["max_symbols"][1]))

    eval_ = command("eval", "WER/CER and realized compute of a checkpoint; hypotheses, per-utterance files")
    eval_.add_argument("checkpoint", help="a checkpoint written by train (last.pt, best.pt, averaged.pt)")
    eval_.add_argument("--out", help="output directory (default: eval_<checkpoint>_<data>_<decoding> beside "
                       "the checkpoint)")
    _config_flags(eval_, COMMAND_KEYS["eval"], default_of=lambda k: "the checkpoint's" if k in (
        "data", "split", *EVAL_FROM_CHECKPOINT) else repr(CONFIG[k][0]),
        aliases=dict(data=["--eval-data"], split=["--eval-split"]),
        helps=dict(data="data to decode: a corpus directory or LibriSpeech root (the checkpoint's "
                        "--eval-data, else its --data)", split="LibriSpeech split of the data"))

    demo = command("demo", "dense vs AmNets on a small espeak-ng corpus (results.json, table.txt)")
    demo.add_argument("--out", help="work directory: corpus, checkpoints, results (default ./amnets_demo; "
                      "--tiny: a new temporary directory); printed at the start")
    demo.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny models, few steps)")
    demo.add_argument("--utterances", type=int, default=0,
                      help="corpus size (default 450, a fifth held out; tiny 24); a corpus in --out made with "
                      "other --utterances or --seed is made anew")
    demo.add_argument("--stream-threads", type=int, default=1,
                      help="torch threads while timing stream (default 1)")
    _config_flags(demo, COMMAND_KEYS["demo"], default_of=lambda k: (
        f"{DEMO.get(k, CONFIG[k][0])!r}; tiny {TINY.get(k, CONFIG[k][0])!r}" if k in DEMO or k in TINY
        else repr(CONFIG[k][0])))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, with a word on the flags eval takes from the checkpoint
        hint = ""
        keys = {u.split("=")[0].lstrip("-").replace("-", "_") for u in unknown}
        if args.command == "eval" and keys & set(CONFIG):
            hint = EVAL_HINT
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ak.FallbackWarning)  # a fallback face is slower, not wrong
            shown = warnings.showwarning

            def show(message, category, *rest):  # about the user's data: one line, as errors are
                if issubclass(category, DataWarning):
                    print(f"amnets {args.command}: warning: {message}", file=sys.stderr)
                else:
                    shown(message, category, *rest)
            warnings.showwarning = show
            return COMMANDS[args.command](args)
    except (UsageError, ValueError, OSError, TrainingDiverged) as exc:
        if args.debug:
            raise
        print(f"amnets {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1 if isinstance(exc, TrainingDiverged) else 2
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # sizes past the memory (a --hidden-size, a batch)
        found = re.search(r"(?:can't allocate memory|out of memory)[^.]*", str(exc), re.IGNORECASE)
        if args.debug or not (isinstance(exc, torch.OutOfMemoryError) or found):
            raise
        print(f"amnets {args.command}: error: out of memory ({found[0] if found else exc}); lower --hidden-size, "
              "--batch-size or the model's other sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"amnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
