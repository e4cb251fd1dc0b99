"""The benchmark harness: interleaving, medians of per-round ratios, failures and missing faces
reported as rows (never silently dropped). Times are faked: tests check arithmetic, not speed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness


def fake_times(monkeypatch, table):
    """_time returns table[label][i] for the i-th timing of that candidate (warm-up estimate first)."""
    calls = {}

    def fake(fn, n, device):
        fn()  # a failing candidate fails here, as with the real timer
        label = fn.label
        i = calls.get(label, 0)
        calls[label] = i + 1
        return table[label][min(i, len(table[label]) - 1)]

    monkeypatch.setattr(harness, "_time", fake)
    return calls


def candidate(label, kind="face", fails=False):
    def fn():
        if fails:
            raise RuntimeError("not implemented for this layout")

    fn.label = label
    return harness.Candidate(label, fn, kind)


def test_ratio_is_median_of_per_round_ratios(monkeypatch):
    import torch

    base, fast = candidate("dense", "baseline"), candidate("amnets[cpu]")
    # first two values: warm-up and estimate; then 3 rounds. Per-round ratios 0.5, 0.25, 1.0 -> median 0.5
    fake_times(monkeypatch, {"dense": [1.0, 1.0, 2.0, 4.0, 1.0], "amnets[cpu]": [1.0, 1.0, 1.0, 1.0, 1.0]})
    case = harness.Case("op", "shape", "fwd", {}, base, [fast], skipped=[("amnets[cuda]", "not on cpu")])
    rows = harness.measure(case, torch.device("cpu"), rounds=3, round_s=0.0, budget_s=100.0)
    by_label = {r.label: r for r in rows}
    assert by_label["dense"].ratio is None and by_label["dense"].median_ms == pytest.approx(2000.0)
    assert by_label["amnets[cpu]"].ratio == pytest.approx(0.5)
    # the spread: min and max of the same per-round ratios, shown in the table beside the median
    cpu = by_label["amnets[cpu]"]
    assert (cpu.ratio_min, cpu.ratio_max) == pytest.approx((0.25, 1.0))
    assert by_label["dense"].ratio_min is None
    assert by_label["amnets[cuda]"].median_ms is None and by_label["amnets[cuda]"].note == "not on cpu"
    table = harness.markdown(rows)
    assert "| 0.50 | 0.25–1.00 (3 rounds) |" in table and "| baseline | 3 rounds |" in table


def test_failing_candidate_is_reported_not_dropped(monkeypatch):
    import torch

    fake_times(monkeypatch, {"dense": [1.0]})
    case = harness.Case("op", "shape", "fwd", {}, candidate("dense", "baseline"), [candidate("torch BSR", "other", fails=True)])
    rows = harness.measure(case, torch.device("cpu"), rounds=3, round_s=0.0)
    bsr = next(r for r in rows if r.label == "torch BSR")
    assert bsr.median_ms is None and "failed: RuntimeError: not implemented" in bsr.note
    assert "| torch BSR |" in harness.markdown(rows)


def test_quick_run_writes_table_and_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "rnnt", "--out", str(tmp_path),
                           "--name", "smoke"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| rnnt_loss |" in done.stdout and "torchaudio rnnt_loss" in done.stdout
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["device_type"] == "cpu" and report["threads"] == 2 and report["rows"]
    labels = {r["label"] for r in report["rows"]}
    assert "torchaudio rnnt_loss" in labels and "amnets[reference]" in labels
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_contention_quick_run_times_quiet_and_loaded_and_stops_its_hog():
    done = subprocess.run([sys.executable, "-m", "benchmarks.contention", "--quick", "--filter", "bsr_linear"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| bsr_linear")]
    assert len(rows) == 3  # M=1, M=16 forward and M=16 fwd+bwd; the stock rows are filtered out
    for label, quiet, loaded, growth, verdict, stalls in rows:
        quiet, loaded, half = float(quiet), float(loaded), 0.0005  # printed to 3 decimals
        assert quiet > half and loaded > half
        assert (loaded - half) / (quiet + half) - 0.01 <= float(growth) <= (loaded + half) / (quiet - half) + 0.01
        assert verdict.strip() in ("met", "**missed**")
        assert all(n.strip().isdigit() for n in stalls.split("/"))  # the guard's stalls, quiet / with the hog
    assert not any(b"while True: pass" in _cmdline(p) for p in Path("/proc").glob("[0-9]*")), \
        "the busy-loop process outlived the benchmark"


def test_frame_engine_quick_run_gives_every_target_row_with_its_cache_regime():
    """benchmarks/frame_engine.py (in `make bench`; README's frame-engine tables come from it) end to end at its
    --quick sizes: every row has a number, a goal and a verdict that agree, and the large model's rows name their
    cache regime (issue 17: a ratio flattered or penalised by residency must say so)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.frame_engine", "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    targets = done.stdout.split("|---|---|---|---|\n", 1)[1].split("\n\n", 1)[0]  # the first table
    rows = [line.split(" | ") for line in targets.splitlines()]
    assert len(rows) >= 16, done.stdout
    for label, measured, goal, met in rows:
        value, (sign, bound) = float(measured), goal.split()
        assert met.rstrip(" |") == ("yes" if (value <= float(bound) if sign == "<=" else value >= float(bound)) else "no")
    regimes = [label for label, *_ in rows if " x3 " in label and "B=" not in label]
    assert len(regimes) == 4 and sum("[cache: back to back; cheap " in r for r in regimes) == 2
    assert sum("[dram: " in r and "MB read before each call]" in r for r in regimes) == 2


def test_amx_rows_runs_on_the_emulation_and_says_when_the_cpu_has_no_tiles():
    """benchmarks/amx_rows.py is for a CPU with AMX (issue 17's Intel Xeon, which no session has had yet): here its
    rows run with the scalar emulation as the tiles, and without --emulate on a CPU without AMX it says so."""
    import amnets_kernels as ak

    done = subprocess.run([sys.executable, "-m", "benchmarks.amx_rows", "--quick", "--emulate"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| bsr_linear")
            or line.startswith("| lowrank")]
    assert len(rows) == 6, done.stdout
    for _, m, on, off, ratio in rows:
        assert int(m) in (8, 16) and float(on) > 0 and float(off) > 0 and float(ratio.rstrip(" |")) > 0
    if ak.build_info()["cpu_bf16_bsr_kernel"] != "amx tiles":
        done = subprocess.run([sys.executable, "-m", "benchmarks.amx_rows", "--quick"], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and "offers no AMX tiles" in done.stdout


def test_cpu_suite_names_only_benchmarks_that_exist():
    """benchmarks/cpu_suite.sh runs on a CPU kind we rarely get (a long QUICK=1 run checked it end to end): here
    its syntax, and that every module and --ops it names exists."""
    from benchmarks.__main__ import SUITES

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    modules = set(re.findall(r"-m (benchmarks\.\w+)", text))
    assert {"benchmarks.amx_rows", "benchmarks.frame_engine", "benchmarks.contention"} <= modules
    for module in modules:
        assert (script.parent / (module.split(".")[1] + ".py")).exists(), module
    assert set(re.findall(r"--ops (\w+)", text)) <= set(SUITES)


FAKE_GPU_PYTHON = """#!/usr/bin/env bash
# stands in for the GPU machine's python3: answers the suite's probes, and every stage's command hangs
if [ "$1" = -c ]; then
  case "$2" in
    *get_device_name*) echo "Fake GPU" ;;
    *get_device_capability*) echo 9.0a ;;
    *__version__*) echo 0.0 ;;
  esac
  exit 0
fi
exec sleep 300
"""


def test_gpu_suite_ends_by_its_deadline_and_says_what_it_skipped(tmp_path):
    """A device call is killed at 10 minutes and the lease is 15: gpu_suite.sh cuts every stage's time limit
    to what is left of DEADLINE, skips what no longer fits, and still writes its summary. Here every stage
    hangs (a fake python3), so the build uses up the deadline and every later stage must be skipped."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_GPU_PYTHON)
    fake.chmod(0o755)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"
    env = {"PATH": "/usr/bin:/bin:/usr/local/cuda/bin", "PYTHON": str(fake), "OUT_DIR": str(tmp_path / "out"),
           "DEADLINE": "26"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    log = (tmp_path / "out" / "fake-gpu-gpu-suite.log").read_text()
    assert "build exit 124" in log, log  # the build's 300 s limit was cut to the deadline's 11 s
    stages = re.findall(r"^== \[(\d+) s\] (.*)$", log, re.M)
    assert int(stages[-1][0]) <= 26 and stages[-1][1].startswith("done:"), log
    later = [name for _, name in stages if name.startswith(("tests on CUDA", "issue 1", "lowrank", "benchmarks"))]
    assert len(later) == 6 and log.count("skipped: DEADLINE reached") == 6, log
    assert done.returncode == 1


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_frame_engine_cuda_rows_run_end_to_end(monkeypatch, capsys):
    """benchmarks/frame_engine_cuda.py runs only on a lent GPU, where a crash costs the lease: here every row
    runs on CPU tensors through the interpreted Triton engine (models shrunk, CUDA calls stubbed) and must
    print a measured value, not FAILED."""
    import torch

    import amnets_kernels as ak
    from benchmarks import frame_engine_cuda as bench

    small = bench.encoder
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "encoder", lambda d, h, layers, cheap, device, **kw: small(d, 16, 1, cheap, device))
    monkeypatch.setattr(bench, "hbm_read_gbs", lambda: 1000.0)
    monkeypatch.setattr(bench, "CHUNK", 2)
    monkeypatch.setattr(bench, "MIXED_BATCH", 4)
    monkeypatch.setattr(bench, "MIXED_CHUNK", 1)
    monkeypatch.setattr(bench, "no_host_sync", lambda streamer, x: "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "no GPU (interpreter)")
    with ak.use_backend("triton"):
        bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "FAILED" not in out, out
    rows = [line for line in out.splitlines() if line.startswith("| H=")]
    assert len(rows) == 2 * (2 + 1) + 2 * 2 + 2 * 3, out  # B=1 big (2 ratios + syncs), H=192 (2), B=64 (3)
