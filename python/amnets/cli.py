"""`amnets train|eval|demo` (also `python -m amnets ...`).

  train  AdamW on an espeak-ng corpus directory (make_corpus) or a LibriSpeech split; Gumbel temperature
         annealed exponentially from tau0 to tau_min; cost_weight (and optional budget) on the compute
         cost; checkpoints (model, optimizer, step, config) and --resume. Under torchrun it trains
         data-parallel (DistributedDataParallel, gloo on the CPU, DistributedSampler).
  eval   greedy decoding of a checkpoint: WER, CER, fraction of frames on the full branch, MACs per frame.
  demo   a small espeak-ng corpus, a dense baseline and both AmNets variants trained on the CPU, and a table
         of WER, full-branch fraction, MACs per frame, streaming time per frame and the user-perceived
         latency on a simulated device running the dense model at 1.2x real time.

Configuration: the defaults in CONFIG, overridden by a checkpoint's config (eval, --resume), then by a
--config file (JSON or TOML, the same flat keys), then by command-line flags (--hidden-size 256, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import tomllib
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

import amnets_kernels as ak

from .data import CharTokenizer, SpeechDataset, collate, corpus_items, librispeech_items, make_corpus
from .encoder import CHEAP_KINDS, FORCE_KINDS
from .latency import simulate_latency
from .model import AmNetsRNNT, stack_frames

# key: (default, help). A default of None takes a value of the type named in NULLABLE.
CONFIG = {
    # data
    "data": ("", "an espeak-ng corpus directory (make_corpus) or a LibriSpeech root (with --split)"),
    "split": ("", "LibriSpeech split under --data, e.g. train-clean-100; empty: --data is a corpus dir"),
    "eval_data": ("", "evaluation data (eval; default: --data)"),
    "eval_split": ("", "LibriSpeech split of --eval-data"),
    # model
    "hidden_size": (256, "encoder LSTM width"),
    "num_layers": (2, "encoder LSTM layers"),
    "cheap": ("sparse", "cheap branch: sparse or lowrank"),
    "force": (None, "full: the dense baseline (no arbitrator); cheap: the cheap branch only"),
    "sparsity": (0.8, "fraction of blocks the sparse branch drops"),
    "block_size": (32, "block edge of the sparse branch"),
    "rank": (32, "rank of the low-rank branch"),
    "arbitrator_hidden": (32, "arbitrator hidden width"),
    "init_p_full": (0.5, "p_full of the untrained arbitrator"),
    "threshold": (0.5, "inference decides full when p_full > threshold"),
    "stack": (3, "frames stacked per encoder step (and its stride)"),
    "pred_hidden": (128, "prediction network width"),
    "joint_hidden": (128, "joint network width"),
    # training
    "steps": (1000, "optimizer steps in all (a resumed run continues up to this)"),
    "batch_size": (8, "utterances per step per process"),
    "lr": (2e-3, "AdamW learning rate"),
    "weight_decay": (0.01, "AdamW weight decay"),
    "grad_clip": (5.0, "max gradient norm (0: no clipping)"),
    "tau0": (2.0, "Gumbel-sigmoid temperature at step 0"),
    "tau_min": (0.5, "Gumbel-sigmoid temperature at the last step"),
    # The RNN-T term is a sum over an utterance's frames (hundreds of nats at first) while the cost fraction
    # is a mean in [0, 1]: a weight of O(10) is what makes the penalty felt.
    "cost_weight": (10.0, "weight of the compute-cost penalty"),
    "budget": (None, "penalise only the cost fraction above this (0..1); none: all of it"),
    "seed": (0, "seed of initialisation, data order and the corpus"),
    "checkpoint_dir": ("checkpoints", "where last.pt goes"),
    "checkpoint_every": (100, "steps between checkpoints (one is always written at the end)"),
    "save_every_rank": (False, "every rank also writes last.rank<r>.pt (to compare ranks)"),
    "log_every": (50, "steps between logged lines"),
    "threads": (0, "torch threads per process (0: torch's default)"),
    "progress": (True, "tqdm progress bar"),
}
NULLABLE = {"force": str, "budget": float}
MODEL_KEYS = ("hidden_size", "num_layers", "cheap", "force", "sparsity", "block_size", "rank",
              "arbitrator_hidden", "init_p_full", "threshold", "stack", "pred_hidden", "joint_hidden")


def defaults() -> dict:
    return {key: default for key, (default, _) in CONFIG.items()}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")
    return low in ("true", "1", "yes")


def _value_type(key: str):
    default = CONFIG[key][0]
    if key in NULLABLE:
        kind = NULLABLE[key]
        return lambda text: None if text.lower() in ("none", "") else kind(text)
    return _parse_bool if isinstance(default, bool) else type(default)


def load_config_file(path: str) -> dict:
    """A flat JSON or TOML table of CONFIG keys (by extension: .json, else TOML)."""
    with open(path, "rb") as f:
        got = json.load(f) if path.endswith(".json") else tomllib.load(f)
    unknown = sorted(set(got) - set(CONFIG))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}; known: {sorted(CONFIG)}")
    return got


def check_config(cfg: dict) -> dict:
    """Types and ranges of the training configuration; errors name the key."""
    for key, value in cfg.items():
        default = CONFIG[key][0]
        if value is None and key in NULLABLE:
            continue
        want = NULLABLE.get(key, type(default))
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            cfg[key], ok = float(value), True
        if not ok:
            raise ValueError(f"config: {key} must be a {want.__name__}; got {value!r}")
    if cfg["cheap"] not in CHEAP_KINDS:
        raise ValueError(f"config: cheap must be one of {CHEAP_KINDS}; got {cfg['cheap']!r}")
    if cfg["force"] not in FORCE_KINDS:
        raise ValueError(f"config: force must be one of {FORCE_KINDS}; got {cfg['force']!r}")
    if cfg["budget"] is not None and not 0.0 <= cfg["budget"] <= 1.0:
        raise ValueError(f"config: budget must be none or in [0, 1]; got {cfg['budget']!r}")
    positive = ("hidden_size", "num_layers", "block_size", "rank", "arbitrator_hidden", "stack",
                "pred_hidden", "joint_hidden", "steps", "batch_size", "checkpoint_every", "log_every")
    for key in positive:
        if cfg[key] < 1:
            raise ValueError(f"config: {key} must be >= 1; got {cfg[key]!r}")
    for key in ("lr", "tau0", "tau_min"):
        if not 0 < cfg[key] < math.inf:
            raise ValueError(f"config: {key} must be a finite number > 0; got {cfg[key]!r}")
    for key in ("weight_decay", "grad_clip", "cost_weight", "threads"):
        if cfg[key] < 0:
            raise ValueError(f"config: {key} must be >= 0; got {cfg[key]!r}")
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
    split = str.split if unit == "word" else list
    total = sum(len(split(r)) for r in refs)
    if total == 0:
        raise ValueError("error_rate: the references are empty")
    return sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps)) / total


# ---------------------------------------------------------------------------------------------------
# building blocks


def load_items(data: str, split: str) -> list[tuple[str, str]]:
    if not data:
        raise ValueError("--data is required: an espeak-ng corpus directory or a LibriSpeech root")
    return librispeech_items(data, split) if split else corpus_items(data)


def build_model(cfg: dict, vocab_size: int) -> AmNetsRNNT:
    return AmNetsRNNT(80, vocab_size, **{k: cfg[k] for k in MODEL_KEYS})


def temperature(cfg: dict, step: int) -> float:
    """Exponential anneal: tau0 at step 0, tau_min at the last step (steps - 1)."""
    progress = step / max(cfg["steps"] - 1, 1)
    return cfg["tau0"] * (cfg["tau_min"] / cfg["tau0"]) ** min(progress, 1.0)


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


def _save(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact


def train(cfg: dict, resume: str | None = None, items: list | None = None) -> tuple[AmNetsRNNT, dict]:
    """Train as configured; under torchrun (WORLD_SIZE > 1) data-parallel. items: (audio path, transcript)
    pairs to train on instead of cfg's data. Returns (model, the last step's stats)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # the model trains on the CPU
    rank = dist.get_rank() if world > 1 else 0
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tokenizer = CharTokenizer()
    dataset = SpeechDataset(items if items is not None else load_items(cfg["data"], cfg["split"]), tokenizer)
    torch.manual_seed(cfg["seed"])  # the same initial model on every rank (DDP also broadcasts it)
    model = build_model(cfg, tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = 0
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the run's own --lr / --weight-decay, not the saved ones
            group["lr"], group["weight_decay"] = cfg["lr"], cfg["weight_decay"]
        step = ckpt["step"]
    torch.manual_seed(cfg["seed"] * 1000 + rank + step)  # Gumbel noise: its own stream per rank and resume
    # A forced encoder never runs its arbitrator (and the dense baseline never its cheap factors).
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg["force"] is not None) \
        if world > 1 else model
    os.makedirs(cfg["checkpoint_dir"], exist_ok=True)
    lengths = [dataset.duration(i) for i in range(len(dataset))]
    n_batches = len(batches(lengths, cfg, 0, rank, world))
    bar = tqdm(total=cfg["steps"], initial=step, disable=rank != 0 or not cfg["progress"], file=sys.stderr,
               dynamic_ncols=True)
    stats: dict = {}
    checkpoints = _Checkpoints(cfg, rank)
    model.train()
    while step < cfg["steps"]:
        epoch, skip = divmod(step, n_batches)
        for batch in batches(lengths, cfg, epoch, rank, world)[skip:]:
            if step >= cfg["steps"]:
                break
            model.encoder.tau = temperature(cfg, step)
            loss, stats = ddp(*collate([dataset[i] for i in batch]), cost_weight=cfg["cost_weight"],
                              budget=cfg["budget"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The norm of the (all-reduced, so on every rank the same) gradient: clipped when configured,
            # and a non-finite one stops every rank at the same step, before it reaches the weights.
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or math.inf))
            if not (math.isfinite(loss.item()) and math.isfinite(norm)):
                checkpoints.discard()
                raise TrainingDiverged(f"amnets train: the loss or its gradient became non-finite at step {step + 1} "
                                       f"(loss {loss.item():.4g}, gradient norm {norm:.4g}); stopped, and "
                                       f"{checkpoints.kept()}. Lower --lr (now {cfg['lr']:g}) or set --grad-clip.")
            checkpoints.confirm()  # the weights of the pending checkpoint gave a finite loss and gradient
            optimizer.step()
            step += 1
            stats = dict(stats, tau=model.encoder.tau, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", full=f"{stats['full_fraction']:.2f}",
                            tau=f"{stats['tau']:.2f}")
            if rank == 0 and (step % cfg["log_every"] == 0 or step == cfg["steps"]):
                shown = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "step")
                tqdm.write(f"step {step} {shown}", file=sys.stderr)
            if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    checkpoints.discard()
                    raise TrainingDiverged(f"amnets train: a weight became non-finite at step {step}; stopped, and "
                                           f"{checkpoints.kept()}. Lower --lr (now {cfg['lr']:g}) or set --grad-clip.")
                payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, config=cfg)
                checkpoints.write(payload, final=step == cfg["steps"])
    bar.close()
    if world > 1:
        dist.barrier()  # rank 0's checkpoint is complete before any rank returns
    return model, stats


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss, gradient or weight and stopped (no checkpoint written)."""


class _Checkpoints:
    """last.pt (rank 0) and last.rank<r>.pt (save_every_rank), replaced only by weights known to be good.

    A checkpoint taken during training is written beside its target (<name>.pending) and moved into place
    only once the next step has computed a finite loss and gradient from its weights: weights that an
    optimizer step blew up (finite but huge, then NaN a step later) never replace the last good ones.
    The final checkpoint, with no next step, goes into place at once (its weights checked finite).
    """

    def __init__(self, cfg: dict, rank: int):
        names = (["last.pt"] if rank == 0 else []) + ([f"last.rank{rank}.pt"] if cfg["save_every_rank"] else [])
        self.paths = [os.path.join(cfg["checkpoint_dir"], name) for name in names]
        self.directory = cfg["checkpoint_dir"]
        self.discard()  # one left by a run killed between a checkpoint and its next step was never confirmed

    def write(self, payload: dict, final: bool) -> None:
        for path in self.paths:
            _save(path if final else path + ".pending", payload)
        if final:
            self.discard()

    def confirm(self) -> None:
        for path in self.paths:
            if os.path.exists(path + ".pending"):
                os.replace(path + ".pending", path)

    def discard(self) -> None:
        for path in self.paths:
            if os.path.exists(path + ".pending"):
                os.remove(path + ".pending")

    def kept(self) -> str:
        have = [p for p in self.paths if os.path.exists(p)]
        if not have:
            return f"no checkpoint was written to {self.directory}"
        return "the last good checkpoint is kept: " + ", ".join(
            f"{p} (step {torch.load(p, map_location='cpu', weights_only=False)['step']})" for p in have)


def load_checkpoint(path: str) -> tuple[AmNetsRNNT, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = check_config(dict(defaults(), **ckpt["config"]))
    model = build_model(cfg, CharTokenizer().vocab_size)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


@torch.no_grad()
def evaluate(model: AmNetsRNNT, dataset: SpeechDataset, batch_size: int = 16) -> dict:
    """Greedy-decode every utterance: WER, CER, the fraction of (valid encoder) frames on the full branch
    (per layer with per-layer decisions) and the mean MACs per frame the encoder spent."""
    model.eval()
    refs, hyps, full, macs, frames = [], [], 0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        feats, feat_lens, _, _ = collate([dataset[i] for i in idx])
        labels, decisions, enc_lens = model.greedy_decode(feats, feat_lens, return_decisions=True)
        hyps += [dataset.tokenizer.decode(h) for h in labels]
        refs += [dataset.items[i][1].lower() for i in idx]
        valid = torch.arange(decisions.shape[1])[None] < enc_lens[:, None]
        per_frame = decisions.reshape(*valid.shape, -1).float().mean(-1)
        full += float(per_frame[valid].sum())
        macs += float(model.encoder.realized_macs(decisions)[valid].sum())
        frames += int(valid.sum())
    return dict(wer=error_rate(refs, hyps, "word"), cer=error_rate(refs, hyps, "char"),
                full_fraction=full / frames, macs_per_frame=macs / frames, utterances=len(refs),
                example=(refs[0], hyps[0]))


@torch.no_grad()
def stream_frame_costs(models: list[AmNetsRNNT], feats, repeats: int = 3) -> list[list[list[float]]]:
    """Seconds per encoder frame at B=1, one frame per call of the encoder's streamer (AmNetsEncoder.streamer:
    the frame engine, state carried from call to call, as a live stream runs): [model][utterance][frame],
    for feats, a list of (T, 80) tensors.

    The models take turns utterance by utterance, and each frame's cost is the median of `repeats`
    passes, so that a machine whose speed drifts (a shared VM) does not favour the model timed first.
    """
    for model in models:
        model.eval()
    runs = [[[] for _ in feats] for _ in models]
    for _ in range(repeats):
        for u, f in enumerate(feats):
            for m, model in enumerate(models):
                x, _ = stack_frames(f[None], torch.tensor([len(f)]), model.stack, model.stack_tail)
                live = model.encoder.streamer()  # a new stream: zero state
                live(x[:, :1])  # warm-up
                live.reset()
                mine = []
                for t in range(x.shape[1]):
                    start = time.perf_counter()
                    live(x[:, t:t + 1])
                    mine.append(time.perf_counter() - start)
                runs[m][u].append(mine)
    return [[[statistics.median(frame) for frame in zip(*passes)] for passes in per_utt] for per_utt in runs]


# ---------------------------------------------------------------------------------------------------
# commands


def cmd_train(cfg: dict, args) -> int:
    try:
        model, stats = train(cfg, args.resume)
    except TrainingDiverged as exc:
        print(exc, file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("step", "loss", "rnnt", "full_fraction", "tau")
        print(json.dumps({k: stats[k] for k in keys if k in stats}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# Model settings eval applies to a checkpoint's model; the others are fixed by the checkpoint.
EVAL_MODEL_KEYS = ("threshold", "force")


def cmd_eval(cfg: dict, args) -> int:
    model, saved = load_checkpoint(args.checkpoint)
    clash = [k for k in sorted(args.explicit) if k in MODEL_KEYS and k not in EVAL_MODEL_KEYS and cfg[k] != saved[k]]
    if clash:
        given = ", ".join(f"--{k.replace('_', '-')} {cfg[k]!r} (checkpoint: {saved[k]!r})" for k in clash)
        print(f"amnets eval: {given} contradict the checkpoint's model; eval takes the model from the checkpoint "
              f"and applies only {', '.join('--' + k for k in EVAL_MODEL_KEYS)}", file=sys.stderr)
        return 2
    model.encoder.threshold = cfg["threshold"]
    model.encoder.force = cfg["force"]
    data = cfg["eval_data"] or cfg["data"]
    split = cfg["eval_split"] if cfg["eval_data"] else cfg["split"]
    result = evaluate(model, SpeechDataset(load_items(data, split)))
    print(json.dumps(result))
    return 0


# (name, config overrides, multiple of the configured steps). The dense model trains 1.5x the steps: its
# steps cost under half an AmNets step (one branch, no arbitrator) and at 800 it is still improving, so
# the baseline is trained at least as well as the models it is compared with.
DEMO_MODELS = (("dense", dict(cheap="lowrank", force="full", cost_weight=0.0), 1.5),
               ("amnets sparse", dict(cheap="sparse"), 1.0), ("amnets lowrank", dict(cheap="lowrank"), 1.0))
# The tiny demo: seconds, for the test suite; it shows the pipeline runs, not that anything is learnt.
TINY = dict(hidden_size=32, num_layers=1, rank=4, block_size=16, pred_hidden=16, joint_hidden=16,
            arbitrator_hidden=8, steps=4, batch_size=4, checkpoint_every=1000, log_every=1000)
# The demo: about 12 minutes in all on a 2-core CPU (dense about 2, each AmNets variant about 4). The
# budget asks the AmNets models for at most half the dense MACs; the dense model has no penalty. At
# lr 3e-3 the dense model trained badly (WER 0.45-0.53 at 800 steps, loss stuck near 15 for 250
# steps); at 1e-3 all three train well.
DEMO = dict(hidden_size=192, num_layers=2, rank=32, block_size=32, steps=800, batch_size=8, lr=1e-3,
            cost_weight=50.0, budget=0.5, checkpoint_every=1000, log_every=100)


def cmd_demo(cfg: dict, args) -> int:
    out = args.out
    n_utt = args.utterances or (24 if args.tiny else 450)
    n_eval = max(2, n_utt // 5)  # 90 held out by default: WER on ~300 words moved by 0.05 between seeds
    corpus = os.path.join(out, "corpus")
    start = time.time()
    if not os.path.isfile(os.path.join(corpus, "transcripts.txt")):
        make_corpus(corpus, n_utt, seed=cfg["seed"])
    items = corpus_items(corpus)
    if len(items) <= n_eval:
        raise ValueError(f"demo: {corpus} holds {len(items)} utterances; need more than {n_eval}")
    # The held-out utterances are the corpus's last ones: make_corpus draws each independently.
    eval_set = SpeechDataset(items[-n_eval:])
    print(f"demo: corpus of {len(items)} utterances ({len(items) - n_eval} train, {n_eval} eval) in "
          f"{time.time() - start:.0f} s", file=sys.stderr)
    train_threads, threads = torch.get_num_threads(), args.stream_threads
    rows, models = [], []
    for name, overrides, step_scale in DEMO_MODELS:
        run = check_config(dict(cfg, **overrides, steps=max(1, round(cfg["steps"] * step_scale)),
                                checkpoint_dir=os.path.join(out, name.replace(" ", "_"))))
        torch.set_num_threads(cfg["threads"] or train_threads)
        t0 = time.time()
        model, _ = train(run, items=items[:-n_eval])
        trained = time.time() - t0
        result = evaluate(model, eval_set)
        rows.append(dict(name=name, steps=run["steps"], trained_s=trained, **result))
        models.append(model)
        print(f"demo: {name}: trained {run['steps']} steps in {trained:.0f} s; WER {result['wer']:.3f}; "
              f"e.g. {result['example']}", file=sys.stderr)
    torch.set_num_threads(threads)  # streaming is timed with pinned threads, the models taking turns
    all_costs = stream_frame_costs(models, [eval_set[i][0] for i in range(len(eval_set))])
    for r, costs in zip(rows, all_costs):
        flat = [c for utt in costs for c in utt]
        r.update(costs=costs, frame_ms=1e3 * sum(flat) / len(flat))
    dense_costs = [c for utt in rows[0]["costs"] for c in utt]
    # The simulated device runs the dense encoder at 1.2x real time; every model's costs get that scale.
    period = 0.01 * cfg["stack"]
    scale = 1.2 * period / (sum(dense_costs) / len(dense_costs))
    print(f"\n{'model':<16} {'steps':>5} {'WER':>6} {'CER':>6} {'full frac':>9} {'MACs/frame':>11} "
          f"{'stream ms/frame':>15} {'x dense':>7} {'UPL s @1.2xRT':>13}")
    for r in rows:
        upl = [simulate_latency([c * scale for c in utt], period)["upl"] for utt in r["costs"]]
        print(f"{r['name']:<16} {r['steps']:5d} {r['wer']:6.3f} {r['cer']:6.3f} {r['full_fraction']:9.2f} "
              f"{r['macs_per_frame']:11.0f} {r['frame_ms']:15.3f} {r['frame_ms'] / rows[0]['frame_ms']:7.2f} "
              f"{sum(upl) / len(upl):13.3f}")
    print(f"\n{len(items) - n_eval} training / {n_eval} eval utterances; stream timed at B=1 with {threads} "
          f"thread(s); frame period {period * 1e3:.0f} ms (stack {cfg['stack']}); total {time.time() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amnets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {
        "train": commands.add_parser("train", help="train a model"),
        "eval": commands.add_parser("eval", help="WER/CER and compute of a checkpoint"),
        "demo": commands.add_parser("demo", help="dense vs AmNets on a small espeak-ng corpus"),
    }
    subs["train"].add_argument("--resume", help="checkpoint to continue from (its config is the base)")
    subs["eval"].add_argument("checkpoint", help="a checkpoint written by train")
    subs["demo"].add_argument("--out", default="amnets_demo", help="work directory (corpus, checkpoints)")
    subs["demo"].add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    subs["demo"].add_argument("--utterances", type=int, default=0,
                              help="corpus size (default 450, a fifth held out; tiny 24)")
    subs["demo"].add_argument("--stream-threads", type=int, default=1,
                              help="torch threads while timing stream (default 1)")
    for sub in subs.values():
        sub.add_argument("--config", help="JSON or TOML file of config keys")
        for key, (default, text) in CONFIG.items():
            sub.add_argument("--" + key.replace("_", "-"), dest=key, type=_value_type(key),
                             default=argparse.SUPPRESS, help=f"{text} (default {default!r})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = defaults()
    if args.command == "demo":
        cfg.update(TINY if args.tiny else DEMO)
    base = getattr(args, "resume", None) or getattr(args, "checkpoint", None)
    if base:
        cfg.update(torch.load(base, map_location="cpu", weights_only=False)["config"])
    given = load_config_file(args.config) if args.config else {}
    given.update({k: v for k, v in vars(args).items() if k in CONFIG})
    args.explicit = set(given)  # what the user set here, for eval to compare with the checkpoint
    cfg.update(given)
    cfg = check_config(cfg)
    warnings.simplefilter("ignore", ak.FallbackWarning)  # a fallback face is slower, not wrong
    return {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}[args.command](cfg, args)


if __name__ == "__main__":
    sys.exit(main())
