"""python -m benchmarks [--quick] [--ops bsr,lowrank_lstm,rnnt,fused_joint] [--filter TEXT]

Times every available face of each op against its baseline on this machine's device (CUDA if present,
else the CPU with pinned threads), prints one markdown table, and writes <out>/<device>.json (rows plus
device, versions and date), .md (with each ratio's min-max over rounds) and .png (when matplotlib is
installed). `make bench` runs this; `make bench QUICK=1` the smoke run. A part of the table (--ops, --filter)
is written under its own name (<device>-<ops>-<filter>), never over the whole table's; a --filter that
matches no case is an error before anything is built or written.
On a GPU, suites that define a GPU grid use it (harness.pick_grid): the issue's target shapes, sized to
fit benchmarks/gpu_suite.sh's lease.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings

import torch


def prefer_installed_package() -> str | None:
    """Import the amnets_kernels that has its compiled extension; say which when it is not the obvious one.

    `python -m benchmarks` puts the working directory first on sys.path. Run from a clone root after a
    non-editable install, `amnets_kernels` would be the clone's source folder, which has no compiled
    extension (it was built into site-packages), so every face row would fail. Then the installed copy is
    imported instead; a source folder built in place (make install, `pip install -e .`) is used as it is."""
    if "amnets_kernels" in sys.modules:
        return None
    spec = importlib.util.find_spec("amnets_kernels")
    if spec is None or not spec.submodule_search_locations:
        return None  # not importable at all: the import below says so
    local = os.path.realpath(next(iter(spec.submodule_search_locations)))
    if any(os.path.exists(os.path.join(local, "_C" + ext)) for ext in importlib.machinery.EXTENSION_SUFFIXES):
        return None
    parent = os.path.dirname(local)
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.getcwd()) != parent]
    try:  # the search and import without the source folder's parent (every finder, editable installs too)
        installed = importlib.util.find_spec("amnets_kernels")
        found = installed is not None and installed.origin is not None and \
            os.path.realpath(os.path.dirname(installed.origin)) != local
        if found:
            import amnets_kernels  # noqa: F401  (cached in sys.modules: every later import gets this copy)
    finally:
        sys.path[:] = saved
    if not found:
        return (f"amnets_kernels ({local}) has no compiled extension and no installed copy was found: "
                f"build it (`make install`, or `pip install --no-build-isolation -e .` in {parent}), "
                "or install it (`pip install --no-build-isolation .`)")
    return (f"using the installed amnets_kernels ({os.path.dirname(installed.origin)}), not the source "
            f"folder {local}, which has no compiled extension")


# Before the suites import amnets_kernels.
_PACKAGE_NOTE = prefer_installed_package()

from .harness import TIMED_FACES, as_dicts, at_least, command_line, everything, markdown, measure  # noqa: E402


def _suite(module: str, function: str):
    """A suite's cases, its module imported when that suite runs: `--ops bsr` needs no torchaudio."""
    def cases(device, quick, wanted=everything):
        return getattr(importlib.import_module(f".{module}", __package__), function)(device, quick, wanted)
    return cases


SUITES = {"bsr": _suite("bsr", "cases"), "bsr_regimes": _suite("bsr", "regime_cases"),
          "lowrank_lstm": _suite("lowrank_lstm", "cases"),
          "rnnt": _suite("rnnt", "loss_cases"), "fused_joint": _suite("rnnt", "joint_cases"),
          "swap": _suite("swap", "cases"), "amnets_encoder": _suite("amnets_encoder", "cases")}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({threads} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# One colour per candidate label in every panel (and every run): our faces fixed, the others in order.
FACE_COLORS = {"amnets[reference]": "tab:gray", "amnets[cpu]": "tab:blue", "amnets[triton]": "tab:orange",
               "amnets[cuda]": "tab:green", "after swap_in": "tab:cyan"}
OTHER_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "gold", "navy", "teal")


def label_colors(labels) -> dict[str, str]:
    labels = set(labels)
    others = sorted(labels - set(FACE_COLORS))
    colors = {label: OTHER_COLORS[i % len(OTHER_COLORS)] for i, label in enumerate(others)}
    return {**colors, **{label: c for label, c in FACE_COLORS.items() if label in labels}}


def figure(rows):
    """Per op, each candidate's median ratio to the baseline per case, with the per-round min-max as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    colors = label_colors(r["label"] for r in rows if r["ratio"] is not None)
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op and r["ratio"] is not None]
        cases = sorted({(r["case"], r["mode"]) for r in mine})
        index = {c: i for i, c in enumerate(cases)}
        for label in sorted({r["label"] for r in mine}):
            got = [r for r in mine if r["label"] == label]
            x = [index[(r["case"], r["mode"])] for r in got]
            y = [r["ratio"] for r in got]
            # rows from before the spread was recorded (or timed once) have no min/max: no bar
            low = [r["ratio"] - r["ratio_min"] if r.get("ratio_min") is not None else 0.0 for r in got]
            high = [r["ratio_max"] - r["ratio"] if r.get("ratio_max") is not None else 0.0 for r in got]
            ax.errorbar(x, y, yerr=[low, high], fmt="o", label=label, color=colors[label], markersize=4,
                        elinewidth=0.8, capsize=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{op}: time / baseline (below 1 = faster; bars: min-max over rounds), "
                     f"{len(cases)} cases")
        if len(cases) <= 16:
            ax.set_xticks(range(len(cases)), [f"{c} {m}" for c, m in cases], rotation=20, ha="right", fontsize=6)
        else:
            ax.set_xticks([])
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot(rows, path: str) -> str | None:
    """Write the plot; without matplotlib (an optional dependency) say why not instead."""
    try:
        fig = figure(rows)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "matplotlib":
            raise
        return "plots skipped: matplotlib is not installed (pip install matplotlib, or the [test] extra)"
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def case_names(ops, device: torch.device, quick: bool) -> dict[str, list[str]]:
    """Every case name of each suite in `ops`, in order, with nothing built (see harness.everything)."""
    names = {}
    for op in ops:
        seen = names[op] = []

        def record(name, seen=seen):
            if name not in seen:
                seen.append(name)
            return False

        for _ in SUITES[op](device, quick, record):
            pass
    return names


def device_arg(text: str) -> torch.device:
    """--device: an argparse type, so that a bad device is one line naming the flag."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type not in TIMED_FACES:
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on {' or '.join(TIMED_FACES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def main(argv=None) -> int:
    parser = command_line(__doc__, "benchmarks")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds per case: a smoke run")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="cpu, cuda or cuda:N (default: cuda where a GPU is, else cpu)")
    parser.add_argument("--threads", type=at_least(1), default=2, help="CPU threads (pinned; default 2)")
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated, of {list(SUITES)}")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    parser.add_argument("--rounds", type=at_least(3), default=None,
                        help="most timed rounds per case (default 7; at least 3). A case whose calls are slow gets "
                             "fewer, down to 3, to stay within about 3 s of timing (1 s on a GPU); --quick times "
                             "3 rounds and takes no --rounds")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for the .json/.md/.png (default: benchmarks/results)")
    parser.add_argument("--name", default=None,
                        help="file name stem (default: the device's name, then -quick for --quick, and for a "
                             "partial run its --ops and --filter, so that a part never replaces the whole table)")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = set(ops) - set(SUITES)
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}; choose from {list(SUITES)}")
    if args.quick and args.rounds is not None:
        parser.error("argument --rounds: --quick times 3 rounds per case; give one or the other")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        parser.error(f"argument --name: {args.name!r} is not a file name stem (no {os.sep!r}; --out picks the folder)")
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as exc:
        parser.error(f"argument --out: cannot write to {args.out!r}: {exc.strerror or exc}")

    if _PACKAGE_NOTE:
        print(f"python -m benchmarks: {_PACKAGE_NOTE}", file=sys.stderr)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    import amnets_kernels as ak

    warnings.simplefilter("ignore", ak.FallbackWarning)  # the table labels every face explicitly
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    # Before anything is built: a --filter that matches nothing is an error, not a long run that writes an empty table.
    names = case_names(ops, device, args.quick)
    if not any(args.filter in n for got in names.values() for n in got):
        where = f"--ops {','.join(ops)} on {device.type}" + (" with --quick" if args.quick else "")
        if args.filter:
            some = [n for got in names.values() for n in got][:3]
            parser.error(f"argument --filter: {args.filter!r} matches none of the {sum(map(len, names.values()))} "
                         f"case names of {where}" + (f" (such as {'; '.join(map(repr, some))})" if some else ""))
        parser.error(f"{where} has no case to run")
    torch.manual_seed(0)
    # GPU calls take microseconds: shorter rounds keep the whole suite inside gpu_suite.sh's 10 minutes.
    timing = dict(rounds=3, round_s=0.005, budget_s=0.5) if args.quick else \
        dict(rounds=args.rounds or 7, round_s=0.005 if device.type == "cuda" else 0.02,
             budget_s=1.0 if device.type == "cuda" else 3.0)
    name = device_name(device, args.threads)
    part = [slug(",".join(ops))] if set(ops) != set(SUITES) else []
    part += [slug(args.filter) or "filtered"] if args.filter else []
    stem = args.name or "-".join([slug(name)] + (["quick"] if args.quick else []) + part)
    rows, start, replaced = [], time.time(), []

    def snapshot(complete: bool) -> dict:
        return {
            "device": name,
            "device_type": device.type,
            "threads": args.threads if device.type == "cpu" else None,
            "quick": args.quick,
            "complete": complete,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.time() - start, 1),
            "build_info": ak.build_info(),
            "rows": as_dicts(rows),
        }

    def write_json(complete: bool) -> dict:
        # Rewritten after every case, so a run cut short by a time limit still leaves its rows.
        got = snapshot(complete)
        if not replaced:  # this run replaces the stem's report: no .md or .png of an earlier run stays beside it
            for ext in (".md", ".png"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.out, stem + ext))
            replaced.append(stem)
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(got, f, separators=(",", ":"))
        return got

    for op in ops:
        for case in SUITES[op](device, args.quick, lambda case_name: args.filter in case_name):
            got = measure(case, device, **timing)
            rows += got
            for r in got:
                ratio = "baseline" if r.kind == "baseline" else ("-" if r.ratio is None else f"{r.ratio:.2f}x")
                ms = "-" if r.median_ms is None else f"{r.median_ms:.3f} ms"
                print(f"[{time.time() - start:7.1f}s] {r.op} | {r.case} | {r.mode} | {r.label}: {ms} {ratio} "
                      f"{r.note}", file=sys.stderr, flush=True)
            write_json(complete=False)
    table = markdown(rows)
    print(table)
    report = write_json(complete=True)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"Device: {name}; torch {torch.__version__}; {report['date']}; `{report['command']}`\n\n")
        f.write(table + "\n")
    skipped = plot(report["rows"], os.path.join(args.out, stem + ".png")) if rows else "no rows to plot"
    if skipped:
        print(skipped, file=sys.stderr)
    written = ".json/.md" + ("" if skipped else "/.png")
    print(f"\nwrote {os.path.join(args.out, stem)}{written} ({report['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
