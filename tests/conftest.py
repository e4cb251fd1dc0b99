"""Shared test setup.

TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, so it is set here, before
anything imports amnets_kernels. AMNETS_TEST_DEVICE=cuda (benchmarks/gpu_suite.sh) runs the face
tests on the GPU with real Triton instead.
"""

import os

DEVICE = os.environ.get("AMNETS_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import amnets_kernels as ak  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Faces that make sense to try on the test device (the cpu face never runs CUDA tensors and back).
FACES = ("reference", "cpu", "triton") if DEVICE == "cpu" else ("reference", "triton", "cuda")


@pytest.fixture
def device():
    return torch.device(DEVICE)


def use_face(op: str, face: str):
    """Context running `op` on `face`, or a pytest skip that says why the face is not there."""
    reason = ak.unavailable_reason(op, face, DEVICE)
    if reason is not None:
        pytest.skip(f"{face} face of {op}: {reason}")
    return ak.use_backend(face)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
