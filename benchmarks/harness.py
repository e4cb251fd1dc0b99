"""Timing that can be compared: every candidate of a case is timed in the same run, interleaved.

A case has one baseline (dense F.linear, nn.LSTM, torchaudio rnnt_loss, ...) and other candidates:
our faces ("amnets[<face>]") and other implementations worth beating. Each round times every
candidate once, in a rotated order, so drift (clock, cache, other load) hits all of them alike.
Reported: the median time per call, the median over rounds of time / baseline time, and the min and max
of those per-round ratios (the spread: how far one round's answer could be from the median).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Candidate:
    label: str  # what the table shows, e.g. "dense F.linear", "amnets[cpu]"
    fn: Callable[[], object]  # one call of the work being timed
    kind: str = "face"  # "baseline" | "face" | "other"
    note: str = ""


@dataclass
class Case:
    op: str
    name: str  # the shape, human-readable
    mode: str  # "fwd" | "fwd+bwd"
    params: dict
    baseline: Candidate
    others: list[Candidate]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, why it was not timed)
    derive: Callable[[float], str] | None = None  # for our faces: seconds per call -> GB/s, time per frame


@dataclass
class Row:
    op: str
    case: str
    mode: str
    label: str
    kind: str
    params: dict
    median_ms: float | None
    ratio: float | None  # median over rounds of time / baseline time (None for the baseline itself)
    rounds: int
    peak_mb: float | None = None
    note: str = ""
    ratio_min: float | None = None  # min and max over rounds of time / baseline time (the spread of `ratio`)
    ratio_max: float | None = None


def at_least(low: int):
    """An argparse type: an int >= low. A bad value is argparse's one-line error naming the flag
    ("argument --threads: must be an int >= 1; got 0"), not a traceback from deep in torch."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}; got {value}")
        return value

    parse.__name__ = f"int >= {low}"  # what argparse calls the type in its messages
    return parse


def command_line(doc: str, module: str) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`: its --help shows the module docstring's first paragraph."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_mean(fn, seconds: float, warmup: int = 1, min_calls: int = 1, sync=lambda: None) -> float:
    """Mean wall seconds of one fn() call over a loop of at least `seconds` and `min_calls` calls, after
    `warmup` calls; `sync` (torch.cuda.synchronize on a GPU) waits for queued work before the clock starts
    and stops, so device time is counted. (benchmarks/overhead.py and checks_cost.py keep their own loop:
    they also run against other checkouts' packages, which need not have this one.)"""
    for _ in range(warmup):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < min_calls:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls


def _time(fn, calls: int, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _peak_mb(fn, device) -> float | None:
    """Extra memory one call needs at its peak: the CUDA allocator's high-water mark on a GPU; on the
    CPU (Linux) the process's resident-set high-water mark, reset just before the call."""
    if device.type != "cuda":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _status_kb("VmRSS")
            fn()
            return max(0, _status_kb("VmHWM") - before) / 1024
        except OSError:
            return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(case: Case, device: torch.device, *, rounds: int = 7, round_s: float = 0.02,
            budget_s: float = 3.0, max_call_s: float = 5.0) -> list[Row]:
    """Time the case's candidates interleaved; a candidate slower than max_call_s is timed once."""
    candidates = [case.baseline, *case.others]
    estimate, notes, failed = {}, {}, {}
    for c in candidates:
        try:
            # Warm-up: first-call costs (allocation, autotuning, lazy init) stay out of the samples,
            # except for a candidate so slow that one call is all it gets.
            estimate[c.label] = _time(c.fn, 1, device)
            if estimate[c.label] <= max_call_s:
                estimate[c.label] = _time(c.fn, 1, device)
        except Exception as exc:  # an unsupported path is a result, not a crash of the benchmark
            failed[c.label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if case.baseline.label in failed:
        timed = []
    else:
        timed = [c for c in candidates if c.label not in failed]
    slowest = max((estimate[c.label] for c in timed), default=0.0)
    n_rounds = max(3, min(rounds, int(budget_s / max(slowest, 1e-9))))
    calls = {c.label: max(1, math.ceil(round_s / max(estimate[c.label], 1e-9))) for c in timed}
    samples: dict[str, list[float]] = {c.label: [] for c in timed}
    once = [c for c in timed if estimate[c.label] > max_call_s]
    for c in once:
        samples[c.label].append(estimate[c.label])
        notes[c.label] = f"1 call (> {max_call_s:g} s), first-call costs included"
    repeated = [c for c in timed if c not in once]
    for r in range(n_rounds):
        shift = r % max(len(repeated), 1)
        for c in repeated[shift:] + repeated[:shift]:
            samples[c.label].append(_time(c.fn, calls[c.label], device))
    base = samples.get(case.baseline.label, [])
    rows = []
    for c in candidates:
        got = samples.get(c.label)
        if not got:
            rows.append(Row(case.op, case.name, case.mode, c.label, c.kind, case.params, None, None, 0,
                            note=failed.get(c.label, "baseline failed")))
            continue
        bounds = (None, None)
        if c is case.baseline:
            ratio = None
        elif len(got) == len(base):
            per_round = [t / b for t, b in zip(got, base)]
            ratio, bounds = statistics.median(per_round), (min(per_round), max(per_round))
        else:  # timed once (too slow to repeat): no per-round ratios, so no spread
            ratio = statistics.median(got) / statistics.median(base)
        derived = case.derive(statistics.median(got)) if case.derive and c.kind == "face" else ""
        note = "; ".join(filter(None, [c.note, notes.get(c.label, ""), derived]))
        rows.append(Row(case.op, case.name, case.mode, c.label, c.kind, case.params,
                        statistics.median(got) * 1e3, ratio, len(got), _peak_mb(c.fn, device), note, *bounds))
    for label, why in case.skipped:
        rows.append(Row(case.op, case.name, case.mode, label, "face", case.params, None, None, 0, note=why))
    return rows


def spread(r: Row) -> str:
    """'0.48–0.55 (7 rounds)': the per-round ratios' range; for the baseline only its round count."""
    if r.median_ms is None:
        return "—"
    n = f"{r.rounds} round{'' if r.rounds == 1 else 's'}"
    if r.kind == "baseline" or r.ratio_min is None:
        return n
    return f"{r.ratio_min:.2f}–{r.ratio_max:.2f} ({n})"


def markdown(rows: list[Row]) -> str:
    """One table: a line per (case, candidate); ratios < 1 are faster than the baseline."""
    show_mem = any(r.peak_mb is not None for r in rows)
    head = ["op", "case", "mode", "candidate", "median ms", "× baseline", "min–max ×"] + \
        (["peak MB"] if show_mem else []) + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.op, r.case, r.mode, r.label, "—" if r.median_ms is None else f"{r.median_ms:.3f}",
                 "baseline" if r.kind == "baseline" else ("—" if r.ratio is None else f"{r.ratio:.2f}"),
                 spread(r)]
        if show_mem:
            cells.append("—" if r.peak_mb is None else f"{r.peak_mb:.0f}")
        cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ---------------------------------------------------------------------------------------------------
# shared by the op modules

# Every suite is cases(device, quick, wanted=everything): `wanted(name)` is asked for each case name before
# anything of that case is built (tensors, models), so that a --filter run builds only what it times, and a
# `wanted` that records the names and says no lists a suite's cases at no cost (python -m benchmarks checks a
# --filter against them before it builds anything).
def everything(name: str) -> bool:
    return True


# Faces worth timing per device: the Triton interpreter on the CPU is a correctness tool, not a speed.
TIMED_FACES = {"cpu": ("reference", "cpu"), "cuda": ("reference", "triton", "cuda")}


def face_candidates(op: str, device: torch.device, call: Callable[[], object],
                    skip_reference: str | None = None) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """One candidate per face of `op` present on `device`, each running `call` under that backend;
    and (label, reason) for every face that is not there, so the table says so."""
    import amnets_kernels as ak

    timed, skipped = [], []
    for face in TIMED_FACES[device.type]:
        label = f"amnets[{face}]"
        reason = ak.unavailable_reason(op, face, device)
        if reason is None and face == "reference" and skip_reference:
            reason = skip_reference
        if reason is not None:
            skipped.append((label, reason))
            continue

        def run(face=face):
            with ak.use_backend(face):
                return call()

        timed.append(Candidate(label, run, "face"))
    return timed, skipped


def rotating(items: list):
    """A function returning the next item each call: candidates cycle over several weight sets so
    that a small weight is not flattered by staying in cache between calls (KERNEL-NOTES)."""
    state = {"i": -1}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def backward_of(forward: Callable[[], torch.Tensor | tuple], seed: int = 0):
    """fwd+bwd call: run forward, then backward with fixed random output gradients."""
    cache = {}

    def call():
        out = forward()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        outs = [o for o in outs if o.requires_grad]
        if "grads" not in cache:
            gen = torch.Generator().manual_seed(seed)
            cache["grads"] = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
        torch.autograd.backward(outs, cache["grads"])
        return out

    return call


def inference(forward: Callable[[], object]):
    """fwd call: no autograd graph, as in streaming inference."""
    def call():
        with torch.no_grad():
            return forward()
    return call


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def pick_grid(device: torch.device, quick: bool, full: dict, quick_grid: dict, gpu: dict | None = None) -> dict:
    """--quick: the smoke grid; on a GPU the suite's GPU grid (sized to fit gpu_suite.sh's lease) where it
    has one; else the full grid of its issue."""
    if quick:
        return quick_grid
    return gpu if device.type == "cuda" and gpu is not None else full
