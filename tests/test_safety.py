"""Memory safety against corrupted index and label data: every route in tests/safety_routes.py, on every
face, in a subprocess of its own (a segfault fails the test instead of killing pytest). The same for the
native ops' other arguments (state shapes, the joint's activation, the FrameEngine's tensors, dtypes, sizes
near 2^63): the cpu face's routes, one group each."""

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
# The groups of safety_routes.py's routes of the native ops' other arguments (route(..., group=...)).
ARGUMENT_GROUPS = ("state_batch", "joint", "frame_engine", "lowrank_cell_backward", "dtypes", "ceil_div")


def run_routes(face: str, group: str = "indices") -> list[dict]:
    """Run safety_routes.py's routes of `group` on `face` in a subprocess; their finished outcomes, after
    asserting that the process ended normally."""
    # The label routes check the named-error contract of host label checks, which CUDA tensors skip by default
    # (device checks: a NaN cost, tests/test_rnnt.py::test_device_label_checks_*).
    env = dict(os.environ, AMNETS_LABEL_CHECKS="host", **({"TRITON_INTERPRET": "1"} if DEVICE == "cpu" else {}))
    run = subprocess.run([sys.executable, str(ROUTES), face, DEVICE, group], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROUTES.parent.parent)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    last = lines[-1]["route"] if lines else "(none)"
    assert run.returncode >= 0, (f"{face}: killed by {signal.Signals(-run.returncode).name} during route {last}\n"
                                 f"{run.stderr[-2000:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    return [line for line in lines if line["outcome"] != "started"]


def assert_named_errors(face: str, done: list[dict]) -> None:
    for line in done:
        want = (line["error"],) if line["error"] else ("ValueError", "TypeError")
        assert line["outcome"] in want, f"{face} {line['route']}: expected {' or '.join(want)}: {line}"
        assert line["argument"] in line["message"], f"{face} {line['route']}: the error does not name it: {line}"


@pytest.mark.parametrize("face", FACES)
def test_corrupted_indices_and_labels_raise_named_errors(face):
    reason = ak.unavailable_reason("bsr_linear", face, DEVICE)
    if reason is not None:
        pytest.skip(f"{face}: {reason}")
    done = run_routes(face)
    assert len(done) >= 13, f"only {len(done)} routes ran: {done}"
    assert_named_errors(face, done)


@pytest.mark.parametrize("group", ARGUMENT_GROUPS)
def test_native_op_arguments_raise_named_errors(group):
    """The native ops called directly (torch.ops.amnets_native.*, the FrameEngine), with what the public ops
    check before them: (state_batch) an LSTM state whose batch is not x's (bsr_lstm_sequence_forward's h was
    heap corruption); (joint) an unknown activation (ran as the identity) or H = 0; (frame_engine) tensors off
    the CPU or not in the weights' dtype (an INTERNAL ASSERT, or a failure at run()); (lowrank_cell_backward)
    errors under the cell's argument names; (dtypes) integer or other-dtype tensors (int64 results, silent
    casts); (ceil_div) out_features = 2^63 - 1 (an overflowing ceil-div). Each raises the route's error type,
    naming the argument."""
    if DEVICE != "cpu" or ak.unavailable_reason("bsr_linear", "cpu", DEVICE) is not None:
        pytest.skip("the cpu face's native ops only")
    done = run_routes("cpu", group)
    assert done, f"no route of group {group} ran"
    assert all(line["error"] for line in done)
    assert_named_errors("cpu", done)

