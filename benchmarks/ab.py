"""The command line of a host-cost benchmark (benchmarks.overhead, benchmarks.checks_cost, benchmarks.serving): print its rows,
or with --against DIR compare them with another checkout of this repository (A/B).

With --against, each round runs the benchmark once with DIR's packages first on the path (DIR is a checkout
with its extension built in place) and once with this checkout's, alternating, ROUNDS rounds; it prints the
median over rounds for each and the median of the per-round ratios (this / DIR). Processes run one at a
time, so the two never share the CPU. Rows the other checkout cannot run are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in(checkout: str, script: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, os.path.join(checkout, "python")]),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, "--worker"], env=env, cwd=checkout,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(doc: str, script: str, measure: Callable[[], dict]) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--against", help="another checkout (extension built in place) to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure()))
        return
    if not args.against:
        for label, us in measure().items():
            print(f"{us:9.1f} us  {label}")
        return
    script = os.path.abspath(script)
    base, this = [], []
    for _ in range(args.rounds):
        base.append(run_in(os.path.abspath(args.against), script))
        this.append(run_in(HERE, script))
    width = max(len(label) for label in this[0])
    print(f"{'row':{width}s} {'other us':>9s} {'this us':>9s} {'this/other':>10s}  (medians of {args.rounds} rounds)")
    for label in [label for label in this[0] if label in base[0]]:
        ratio = statistics.median(t[label] / b[label] for t, b in zip(this, base))
        print(f"{label:{width}s} {statistics.median(b[label] for b in base):9.1f} "
              f"{statistics.median(t[label] for t in this):9.1f} {ratio:10.3f}")
