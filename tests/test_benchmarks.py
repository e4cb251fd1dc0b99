"""The benchmark harness: interleaving, medians of per-round ratios, failures and missing faces
reported as rows (never silently dropped). Times are faked: tests check arithmetic, not speed."""

import json
import os
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


@pytest.mark.serial  # looks for busy-loop processes: the guard's tests start their own
@pytest.mark.parametrize("hogs", [1, 2])
def test_contention_quick_run_times_quiet_and_loaded_and_stops_its_hog(hogs):
    done = subprocess.run([sys.executable, "-m", "benchmarks.contention", "--quick", "--filter", "bsr_linear",
                           "--hogs", str(hogs)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    beside, _, inside = done.stdout.partition("Inside a model")  # the second table: 1 hog only
    rows = [line.split("|")[1:-1] for line in beside.splitlines() if line.startswith("| bsr_linear")]
    assert len(rows) == 3  # M=1, M=16 forward and M=16 fwd+bwd; the stock rows are filtered out
    mixed = [line.split("|")[1:-1] for line in inside.splitlines() if line.startswith("| bsr_linear")]
    assert len(mixed) == (2 if hogs == 1 else 0)  # bf16 and fp32, each after a stock F.linear
    for label, many, one, ratio, seen in mixed:
        assert float(many) > 0 and float(one) > 0 and float(ratio) > 0
        assert all(n.strip().isdigit() for n in seen.split("/"))  # the guard's stalls / own waits
    for label, quiet, loaded, growth, verdict, stalls, alone in rows:
        quiet, loaded, half = float(quiet), float(loaded), 0.0005  # printed to 3 decimals
        assert quiet > half and loaded > half
        def within_rounding(ratio, top, bottom):  # both operands printed rounded by up to `half`
            return (top - half) / (bottom + half) - 0.01 <= float(ratio) <= (top + half) / (bottom - half) + 0.01
        assert within_rounding(growth, loaded, quiet)
        assert verdict.strip() in (("met", "**missed**") if hogs == 1 else ("(reported)",))  # the goal is for 1
        assert all(n.strip().isdigit() for n in stalls.split("/"))  # the guard's stalls, quiet / with the hog
        one, ratio = alone.split()  # one thread, quiet: "ms (ms / quiet)"
        assert float(one) > half and within_rounding(ratio.strip("()"), float(one), quiet)
    assert ("one busy-loop process" if hogs == 1 else f"{hogs} busy-loop processes") in done.stdout
    assert not any(b"while True: pass" in _cmdline(p) for p in Path("/proc").glob("[0-9]*")), \
        "a busy-loop process outlived the benchmark"


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
    later = [name for _, name in stages
             if name.startswith(("tests on CUDA", "issue 1", "lowrank", "bsr_linear", "benchmarks"))]
    assert len(later) == 8 and log.count("skipped: DEADLINE reached") == 8, log
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
    monkeypatch.setattr(bench, "PROFILED_FRAMES", 1)
    monkeypatch.setattr(bench, "SPLITS", (None, 1))
    monkeypatch.setattr(bench, "MIXED_SPLITS", (None, 1))
    monkeypatch.setattr(bench, "no_host_sync", lambda streamer, x: "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "no GPU (interpreter)")
    with ak.use_backend("triton"):
        bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "FAILED" not in out, out
    profiled = [line for line in out.splitlines() if "where a frame's time goes" in line]
    tuned = [line for line in out.splitlines() if "by split" in line or "without CUDA graphs" in line]
    mixed = [line for line in tuned if "B=4: us a frame at f = 0 / 0.25 / 1" in line]
    assert len(mixed) == 1 and "default: " in mixed[0] and "; 1: " in mixed[0], out
    single = [line for line in tuned if line not in mixed]
    assert len(single) == 2 * 2 and all("default: " in line and "; 1: " in line and "its own launch: " in line
                                        for line in single[::2]), out
    calls = [line for line in out.splitlines() if "the graph called natively / from Python" in line]
    assert len(calls) == 2 and all(re.search(r"\| [\d.]+/[\d.]+ / [\d.]+/[\d.]+ \|", line) for line in calls), out
    rows = [line for line in out.splitlines() if line.startswith("| H=") and line not in profiled + tuned + calls]
    assert len(rows) == 2 * (2 + 1) + 2 * 2 + 2 * 3, out  # B=1 big (2 ratios + syncs), H=192 (2), B=64 (3)
    for cheap in ("sparse", "lowrank"):  # the profile's first line of each: wall time, launches, device time
        for force in ("full", "cheap"):
            assert any(f"{cheap} B=1 {force}: where" in line and "us a call" in line for line in profiled), out


# ---------------------------------------------------------------------------------------------------
# The command lines: bad flags are one line naming the flag, partial runs never replace the full table,
# an A/B run compares two checkouts or says why it cannot.

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def one_line_error(stderr: str, flag: str):
    """argparse's error: the usage, then one line naming the flag; no traceback."""
    assert "Traceback" not in stderr, stderr
    assert f"error: argument {flag}" in stderr.strip().splitlines()[-1], stderr


@pytest.fixture
def bench(monkeypatch):
    """benchmarks.__main__ with two fake suites of one trivial case each; `built` lists the cases built."""
    import torch

    from benchmarks import __main__ as bench

    built = []

    def suite(name):
        def cases(device, quick, wanted=lambda name: True):
            if wanted(name):
                built.append(name)
                yield harness.Case("fake_op", name, "fwd", {}, harness.Candidate("base", lambda: None, "baseline"),
                                   [harness.Candidate("amnets[cpu]", lambda: None)])
        return cases

    monkeypatch.setattr(bench, "SUITES", {"fake": suite("tiny case"), "other": suite("other case")})
    monkeypatch.setattr(bench, "plot", lambda rows, path: "plots skipped (test)")
    threads = torch.get_num_threads()  # main() pins the threads of this process: leave them as they are
    bench.full_stem = bench.slug(bench.device_name(torch.device("cpu"), threads))
    bench.args = ["--device", "cpu", "--threads", str(threads)]
    return bench, built


@pytest.mark.parametrize("argv, flag", [(["--threads", "0"], "--threads"), (["--device", "bogus"], "--device"),
                                        (["--device", "meta"], "--device"), (["--rounds", "1"], "--rounds"),
                                        (["--quick", "--rounds", "5"], "--rounds"), (["--name", "a/b"], "--name")])
def test_bad_flags_are_one_line_naming_the_flag(bench, capsys, tmp_path, argv, flag):
    bench, built = bench
    with pytest.raises(SystemExit) as done:
        bench.main(["--ops", "fake", "--out", str(tmp_path)] + argv)
    assert done.value.code == 2
    one_line_error(capsys.readouterr().err, flag)
    assert not built and not list(tmp_path.iterdir())


def test_cuda_device_without_a_gpu_and_an_unwritable_out_are_flag_errors(bench, capsys, tmp_path):
    import torch

    bench, built = bench
    (tmp_path / "file").write_text("")
    bad = [(["--out", str(tmp_path / "file" / "sub")], "--out")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device"))
    for argv, flag in bad:
        with pytest.raises(SystemExit) as done:
            bench.main(["--ops", "fake", "--out", str(tmp_path / "out")] + argv)
        assert done.value.code == 2
        one_line_error(capsys.readouterr().err, flag)
    assert not built


def test_rounds_help_says_what_the_harness_does_with_it(bench, capsys):
    bench, _ = bench
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at least 3" in text and "--quick times 3 rounds" in text


def test_filter_matching_nothing_is_an_error_before_anything_is_built_or_written(bench, capsys, tmp_path):
    bench, built = bench
    with pytest.raises(SystemExit) as done:
        bench.main(bench.args + ["--filter", "zzz_nomatch", "--out", str(tmp_path)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    one_line_error(err, "--filter")
    assert "'tiny case'" in err  # it shows names that exist
    assert not built and not list(tmp_path.iterdir())


def test_filter_matching_nothing_in_a_real_suite_fails_in_seconds(tmp_path):
    """The probe's command: it built bsr's cases for 91 s, then wrote an empty table over the full one's name."""
    done = run_module("-m", "benchmarks", "--ops", "bsr", "--filter", "zzz_nomatch", "--out", str(tmp_path),
                      timeout=60)
    assert done.returncode == 2
    one_line_error(done.stderr, "--filter")
    assert not list(tmp_path.iterdir())


def test_partial_runs_get_their_own_name(bench, tmp_path):
    bench, built = bench
    assert bench.main(bench.args + ["--out", str(tmp_path)]) == 0  # both suites: the full table
    assert bench.main(bench.args + ["--ops", "fake", "--out", str(tmp_path)]) == 0
    assert bench.main(bench.args + ["--filter", "other", "--out", str(tmp_path)]) == 0
    assert bench.main(bench.args + ["--ops", "fake", "--quick", "--out", str(tmp_path)]) == 0
    full = bench.full_stem
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
        f"{stem}.json" for stem in (full, f"{full}-fake", f"{full}-other", f"{full}-quick-fake"))
    cases = json.loads((tmp_path / f"{full}.json").read_text())["rows"]
    assert {r["case"] for r in cases} == {"tiny case", "other case"}  # the full table was not replaced
    assert built == ["tiny case", "other case", "tiny case", "other case", "tiny case"]  # each built when run


def test_a_run_leaves_no_stale_plot_or_table_beside_its_json(bench, tmp_path):
    bench, _ = bench
    for ext in (".png", ".md"):
        (tmp_path / f"smoke{ext}").write_text("from an earlier run")
    assert bench.main(bench.args + ["--ops", "fake", "--quick", "--out", str(tmp_path), "--name", "smoke"]) == 0
    assert not (tmp_path / "smoke.png").exists()  # plot() skipped it: the old one must not stay
    assert "tiny case" in (tmp_path / "smoke.md").read_text()


def test_suites_list_their_case_names_without_building_and_the_names_are_the_cases():
    """python -m benchmarks checks --filter against these names before it builds anything: they must be the names
    the suites give their cases (--quick: built here), and the full grid's must include every case of the
    committed full table."""
    import torch

    from benchmarks.__main__ import SUITES, case_names

    cpu = torch.device("cpu")
    quick = case_names(SUITES, cpu, True)
    for op, suite in SUITES.items():
        assert quick[op] == list(dict.fromkeys(case.name for case in suite(cpu, True))), op
    full = {name for names in case_names(SUITES, cpu, False).values() for name in names}
    committed = json.loads((ROOT / "benchmarks" / "results" / "amd-epyc-2-threads.json").read_text())["rows"]
    assert {r["case"] for r in committed} <= full


TINY_AB = '''"""A tiny A/B benchmark: its one row says which amnets_kernels it timed."""
import os
import sys


def measure():
    import amnets_kernels
    return {"row": 1.0}


if __name__ == "__main__":
    sys.path.append(os.environ["AB_ROOT"])
    from benchmarks import ab

    ab.main(__doc__, __file__, measure)
'''


@pytest.fixture
def tiny_ab(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(TINY_AB)

    def run(*args):
        return run_module(str(script), *args, env=dict(os.environ, AB_ROOT=str(ROOT)))
    return run


def test_ab_run_compares_two_checkouts(tiny_ab):
    done = tiny_ab("--against", str(ROOT), "--rounds", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(medians of 1 rounds)" in done.stdout and done.stdout.splitlines()[-1].split()[-1] == "1.000"


def test_ab_worker_refuses_packages_from_outside_its_checkout(tmp_path):
    """The probe's case: DIR without the packages, so the editable install's finder supplied this checkout's,
    and the A/B table compared this checkout with itself. The measuring process must say so and fail."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(empty), str(empty / "python")]))
    done = run_module(str(ROOT / "benchmarks" / "ab.py"), "--worker", str(empty),
                      str(ROOT / "benchmarks" / "overhead.py"), env=env)
    assert done.returncode == 3 and not done.stdout
    # whichever packages the interpreter found instead are named (this checkout's, or under make asan's scratch
    # copy the editable install's)
    assert f"ab worker: not the packages of {empty}: amnets_kernels from " in done.stderr, done.stderr
    assert f"amnets_kernels from {empty}" not in done.stderr


def test_ab_against_a_checkout_without_its_packages_fails_naming_them(tiny_ab, tmp_path):
    (tmp_path / "co" / "amnets_kernels").mkdir(parents=True)  # a folder, but no package (no __init__.py)
    done = tiny_ab("--against", str(tmp_path / "co"), "--rounds", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr.split("its stderr ends:")[0]
    assert "amnets_kernels from a namespace package" in done.stderr, done.stderr
    assert "row" not in done.stdout  # no table


def test_ab_broken_checkout_shows_the_measuring_process_error(tiny_ab, tmp_path):
    package = tmp_path / "co" / "amnets_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("the compiled extension _C is not built here")\n')
    done = tiny_ab("--against", str(tmp_path / "co"), "--rounds", "1")
    assert done.returncode == 1
    assert "CalledProcessError" not in done.stderr
    assert "the measuring process on" in done.stderr and "_C is not built here" in done.stderr, done.stderr


@pytest.mark.parametrize("argv, flag", [(["--rounds", "0"], "--rounds"), (["--against", "/nonexistent/co"], "--against"),
                                        (["--against", "{empty folder}"], "--against")])
def test_ab_bad_flags_are_one_line(tiny_ab, tmp_path, argv, flag):
    argv = [str(tmp_path) if a == "{empty folder}" else a for a in argv]
    done = tiny_ab(*(["--against", str(ROOT)] + argv))
    assert done.returncode == 2
    one_line_error(done.stderr, flag)


def test_summary_of_a_missing_or_foreign_file_is_one_line(capsys, tmp_path):
    from benchmarks import summary

    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for path in (tmp_path / "missing.json", tmp_path / "text.json", tmp_path / "list.json", tmp_path):
        with pytest.raises(SystemExit) as done:
            summary.main([str(path)])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
            f"python -m benchmarks.summary: error: {path}"), err


def test_summary_reads_every_committed_results_table(capsys):
    """Results written before build_info named the LSTM's bf16 kernel (the bsr headline's) included."""
    from benchmarks import summary

    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        report = json.loads(path.read_text())
        if "rows" in report and "build_info" in report:
            assert summary.main([str(path)]) == 0
            assert capsys.readouterr().out.startswith("Measured on ")


def entry_points():
    """`python -m` names of every benchmarks/*.py with a command line (ab.py is the A/B runs' measuring process)."""
    return sorted("benchmarks" if p.stem == "__main__" else f"benchmarks.{p.stem}"
                  for p in (ROOT / "benchmarks").glob("*.py")
                  if 'if __name__ == "__main__"' in p.read_text() and p.stem != "ab")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of a module already imported
@pytest.mark.parametrize("module", entry_points())
def test_every_entry_point_answers_help_without_running(module, monkeypatch, capsys):
    """--help prints what the command does and runs nothing (cuda_smoke crashed without a GPU, lstm_precision ran
    its whole measurement). Each module runs here as `python -m` runs it, in this process (torch imported once)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} "), out
    assert len(out.split("\n\n")[1].strip()) > 20, out  # a description


def test_the_entry_points_include_the_gpu_scripts():
    assert {f"benchmarks.{name}" for name in ("cuda_smoke", "lstm_precision", "native_path_cuda", "overhead",
                                               "summary")} | {"benchmarks"} <= set(entry_points())


def test_cuda_smoke_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: cuda_smoke runs")
    done = run_module("-m", "benchmarks.cuda_smoke", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no CUDA GPU" in done.stderr


def test_contention_filter_matching_nothing_is_an_error_before_the_hog_starts():
    done = run_module("-m", "benchmarks.contention", "--quick", "--filter", "zzz_nomatch", timeout=120)
    assert done.returncode == 2
    one_line_error(done.stderr, "--filter")
    assert "| row |" not in done.stdout
