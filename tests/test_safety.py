"""Memory safety against corrupted index and label data: every route in tests/safety_routes.py, on every
face, in a subprocess of its own (a segfault fails the test instead of killing pytest)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import amnets_kernels as ak
from conftest import DEVICE, FACES

ROUTES = Path(__file__).with_name("safety_routes.py")


@pytest.mark.parametrize("face", FACES)
def test_corrupted_indices_and_labels_raise_named_errors(face):
    reason = ak.unavailable_reason("bsr_linear", face, DEVICE)
    if reason is not None:
        pytest.skip(f"{face}: {reason}")
    # The label routes check the named-error contract of host label checks, which CUDA tensors skip by default
    # (device checks: a NaN cost, tests/test_rnnt.py::test_device_label_checks_*).
    env = dict(os.environ, AMNETS_LABEL_CHECKS="host", **({"TRITON_INTERPRET": "1"} if DEVICE == "cpu" else {}))
    run = subprocess.run([sys.executable, str(ROUTES), face, DEVICE], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROUTES.parent.parent)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    last = lines[-1]["route"] if lines else "(none)"
    assert run.returncode >= 0, (f"{face}: killed by {signal.Signals(-run.returncode).name} during route {last}\n"
                                 f"{run.stderr[-2000:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    done = [line for line in lines if line["outcome"] != "started"]
    assert len(done) >= 13, f"only {len(done)} routes ran: {run.stdout[-2000:]}"
    for line in done:
        assert line["outcome"] in ("ValueError", "TypeError"), f"{face} {line['route']}: {line}"
        assert line["argument"] in line["message"], f"{face} {line['route']}: the error does not name it: {line}"
