"""`python -m amnets_kernels.aot` compiles Triton kernels for sm_80/sm_90 without a GPU and fails on
spills. Run in a subprocess: this test session interprets Triton (TRITON_INTERPRET=1), which the
compiler cannot take."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = pathlib.Path(__file__).parent


def aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "amnets_kernels.aot", "--module", "aot_toy_kernels", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_fitting_kernel_reports_registers_and_no_spills():
    done = aot("--only", "toy.scale")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "toy.scale" in line]
    assert len(lines) == 2  # sm_80 and sm_90
    for arch, line in zip(("sm_80", "sm_90"), lines):
        assert line.startswith("ok") and arch in line and "registers" in line and "spills 0 B stored / 0 B loaded" in line


def test_spilling_kernel_fails_the_run():
    done = aot("--only", "toy.hog", "--arch", "sm_90")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SPILL" in done.stdout or "FAIL" in done.stdout


def test_parallel_compiles_report_what_one_process_reports():
    import triton

    serial, parallel = aot("--only", "toy.", "--jobs", "1"), aot("--only", "toy.", "--jobs", "2")
    assert serial.returncode == parallel.returncode == 1, serial.stdout + parallel.stdout  # toy.hog spills
    assert serial.stdout == parallel.stdout and serial.stdout.count("toy.") == 4
    assert f"(triton {triton.__version__})" in serial.stdout.splitlines()[-1]


@pytest.mark.parametrize("args, flag, says", [
    (("--only", "no-such-kernel"), "--only", "no configuration name contains 'no-such-kernel'"),  # was a clean exit 0
    (("--jobs", "0"), "--jobs", "must be >= 1; got 0"),  # was run serially
    (("--module", "no_such_module"), "--module", "No module named 'no_such_module'"),  # was a traceback
])
def test_bad_arguments_are_one_line_errors_naming_the_flag(args, flag, says):
    done = aot(*args)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr and f"error: argument {flag}: " in last, done.stderr
    assert says in last, done.stderr


def test_refuses_to_run_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "amnets_kernels.aot"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "TRITON_INTERPRET=1" in done.stderr
