"""The command line of a host-cost benchmark (benchmarks.overhead, benchmarks.checks_cost, benchmarks.serving): print its rows,
or with --against DIR compare them with another checkout of this repository (A/B).

With --against, each round runs the benchmark once with DIR's packages first on the path (DIR is a checkout
with its extension built in place) and once with this checkout's, alternating, ROUNDS rounds; it prints the
median over rounds for each and the median of the per-round ratios (this / DIR). Processes run one at a
time, so the two never share the CPU. Rows the other checkout cannot run are left out. Each measuring process
checks that the packages it compares (amnets_kernels, amnets) came from its checkout, not from an installed or
editable copy found when the checkout lacks them, and fails otherwise.

A measuring process is this file run as a script (`ab.py --worker CHECKOUT SCRIPT`): it imports no module of
this package, so that DIR's own `benchmarks` folder, first on its path, cannot stand in for this one's.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packages a run compares, and where each lives in a checkout (both folders go first on a worker's path).
PACKAGES = {"amnets_kernels": "amnets_kernels", "amnets": os.path.join("python", "amnets")}
STDERR_TAIL = 20  # lines of a failed worker's stderr shown in the error


def search_path(checkout: str) -> list[str]:
    return [checkout, os.path.join(checkout, "python")]


def foreign_packages(checkout: str) -> list[str]:
    """For each imported package of PACKAGES that is not the one in `checkout`: where it came from."""
    wrong = []
    for name, folder in PACKAGES.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        where = getattr(module, "__file__", None)
        if where is None or os.path.realpath(os.path.dirname(where)) != os.path.realpath(os.path.join(checkout, folder)):
            wrong.append(f"{name} from {where or 'a namespace package (no __init__.py)'}")
    return wrong


def worker(checkout: str, script: str) -> int:
    """One measuring process: `script`'s measure() with `checkout`'s packages, the rows as JSON on stdout."""
    for name in PACKAGES:  # imported before measuring, so that a wrong copy fails in seconds, not after the rows
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    wrong = foreign_packages(checkout)
    if not wrong:
        spec = importlib.util.spec_from_file_location("_ab_benchmark", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows = module.measure()
        wrong = foreign_packages(checkout)  # measure() may import more of them
    if wrong:
        print(f"ab worker: not the packages of {checkout}: {'; '.join(wrong)} (the checkout lacks them, or they "
              "are not importable from it: a checkout of this repository with its extension built in place is "
              "needed)", file=sys.stderr)
        return 3
    print(json.dumps(rows))
    return 0


def prog(script: str) -> str:
    """'python -m benchmarks.overhead' for benchmarks/overhead.py."""
    return f"python -m benchmarks.{os.path.splitext(os.path.basename(script))[0]}"


def run_in(checkout: str, script: str) -> dict:
    """One worker process on `checkout`'s packages; a failure exits with the worker's stderr tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(search_path(checkout)), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", checkout, script], env=env,
                          cwd=checkout, capture_output=True, text=True)
    if done.returncode == 0:
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            pass
    tail = "\n".join("  " + line for line in done.stderr.rstrip().splitlines()[-STDERR_TAIL:])
    sys.exit(f"{prog(script)}: error: --against: the measuring process on {checkout} failed "
             f"(exit {done.returncode}){'; its stderr ends:' if tail else ' without a word on stderr'}\n{tail}")


def main(doc: str, script: str, measure: Callable[[], dict]) -> None:
    from .harness import at_least, command_line

    parser = command_line(doc, prog(script).split()[-1])
    parser.add_argument("--against", metavar="DIR",
                        help="another checkout of this repository (extension built in place) to compare with")
    parser.add_argument("--rounds", type=at_least(1), default=5, help="A/B rounds (with --against; default 5)")
    args = parser.parse_args()
    if not args.against:
        for label, us in measure().items():
            print(f"{us:9.1f} us  {label}")
        return
    against = os.path.abspath(args.against)
    if not os.path.isdir(against):
        parser.error(f"argument --against: {args.against!r} is not a directory")
    if not os.path.isdir(os.path.join(against, PACKAGES["amnets_kernels"])):
        parser.error(f"argument --against: {args.against!r} has no amnets_kernels folder: not a checkout of this "
                     "repository")
    script = os.path.abspath(script)
    base, this = [], []
    for _ in range(args.rounds):
        base.append(run_in(against, script))
        this.append(run_in(HERE, script))
    width = max(len(label) for label in this[0])
    print(f"{'row':{width}s} {'other us':>9s} {'this us':>9s} {'this/other':>10s}  (medians of {args.rounds} rounds)")
    for label in [label for label in this[0] if label in base[0]]:
        ratio = statistics.median(t[label] / b[label] for t, b in zip(this, base))
        print(f"{label:{width}s} {statistics.median(b[label] for b in base):9.1f} "
              f"{statistics.median(t[label] for t in this):9.1f} {ratio:10.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 4:
        sys.exit("benchmarks/ab.py is run by benchmarks.overhead, .checks_cost and .serving (--against DIR)")
    sys.exit(worker(*sys.argv[2:]))
