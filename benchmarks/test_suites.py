"""pytest-benchmark view of the same cases as `python -m benchmarks`, one test per (case, candidate):

    pytest benchmarks --benchmark-only                   # quick shapes
    AMNETS_BENCH_FULL=1 pytest benchmarks --benchmark-only -k "bsr and M=16"

`python -m benchmarks` is the interleaved, ratio-reporting run README quotes; this suite is for
pytest-benchmark's own statistics, comparisons (--benchmark-compare) and histograms.
"""

import os
import warnings

import pytest
import torch

import amnets_kernels as ak

from . import bsr, lowrank_lstm, rnnt, swap

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("AMNETS_BENCH_FULL") != "1"
torch.set_num_threads(int(os.environ.get("AMNETS_BENCH_THREADS", "2")))
warnings.simplefilter("ignore", ak.FallbackWarning)


def _params():
    for cases in (bsr.cases, lowrank_lstm.cases, rnnt.loss_cases, rnnt.joint_cases, swap.cases):
        for case in cases(DEVICE, QUICK):
            for candidate in (case.baseline, *case.others):
                try:
                    candidate.fn()
                    marks = ()
                except Exception as exc:  # e.g. torch BSR has no CPU backward: say so, do not time
                    marks = pytest.mark.skip(reason=f"{candidate.label} fails here: {str(exc).splitlines()[0]}")
                yield pytest.param(candidate.fn, id=f"{case.op}|{case.name}|{case.mode}|{candidate.label}",
                                   marks=marks)


@pytest.mark.parametrize("fn", list(_params()))
def test_benchmark(benchmark, fn):
    result = benchmark(fn)
    assert result is not None
