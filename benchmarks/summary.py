"""README's results table from a results JSON written by `python -m benchmarks`:

    python -m benchmarks.summary benchmarks/results/<device>.json [--all] [--no-reference]

Prints the headline rows (the target shapes of the kernel issues), one line per timed candidate,
with the machine, date and command the numbers came from. --all prints every timed row;
--no-reference leaves out the reference face (the pure-PyTorch oracle, not meant to be fast).
"""

import json
import sys

from . import amnets_encoder, bsr, lowrank_lstm, rnnt, swap
from .harness import command_line

HEADLINES = {"bsr_linear": bsr.headline, "lowrank_lstm_sequence": lowrank_lstm.headline,
             "rnnt_loss": rnnt.loss_headline, "fused_joint_rnnt_loss": rnnt.joint_headline, "swap_in": swap.headline,
             "amnets_encoder": amnets_encoder.headline}


def table(report: dict, everything: bool = False, reference: bool = True) -> str:
    rows = [r for r in report["rows"] if reference or r["label"] != "amnets[reference]"]
    pick = (lambda r: True) if everything or report.get("quick") else \
        (lambda r: HEADLINES[r["op"]](r["params"], r["mode"]))
    chosen = [r for r in rows if pick(r)]
    baselines = {(r["op"], r["case"], r["mode"]): r for r in chosen if r["kind"] == "baseline"}
    info = report["build_info"]
    # Which bf16 CPU kernels ran (AMX tiles, AVX512-BF16 dot products or fp32): they differ between CPU kinds.
    # (results from before the LSTM's kernel was recorded name only bsr_linear's)
    kernels = "" if "cpu_bf16_bsr_kernel" not in info else \
        f"; bf16 CPU kernels: bsr_linear {info['cpu_bf16_bsr_kernel']}" + \
        (f", LSTM {info['cpu_bf16_lowrank_lstm_kernel']}" if "cpu_bf16_lowrank_lstm_kernel" in info else "")
    lines = [f"Measured on {report['device']}, {report['date'][:10]}, by `{report['command'].strip()}` "
             f"(torch {info['torch']}{kernels}).", "",
             "| op | case | mode | baseline | baseline ms | candidate | ms | × baseline "
             "| min–max × (rounds) | peak MB (baseline → candidate) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in chosen:
        base = baselines.get((r["op"], r["case"], r["mode"]))
        if r["kind"] == "baseline" or r["median_ms"] is None or base is None or base["median_ms"] is None:
            continue
        memory = "—" if r.get("peak_mb") is None or base.get("peak_mb") is None else \
            f"{base['peak_mb']:.0f} → {r['peak_mb']:.0f}"
        # results written before the spread was recorded have no ratio_min / ratio_max
        spread = "—" if r.get("ratio_min") is None else \
            f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} ({r['rounds']})"
        lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {base['label']} | {base['median_ms']:.2f} | "
                     f"{r['label']} | {r['median_ms']:.2f} | {r['ratio']:.2f} | {spread} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = command_line(__doc__, "benchmarks.summary")
    parser.add_argument("json", help="a results JSON written by python -m benchmarks")
    parser.add_argument("--all", action="store_true", help="every timed row, not only the headline shapes")
    parser.add_argument("--no-reference", action="store_true", help="leave out the reference face's rows")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            report = json.load(f)
    except OSError as exc:
        parser.error(f"{args.json}: {exc.strerror or exc}")
    except ValueError as exc:  # not JSON, or not text
        parser.error(f"{args.json}: not a results JSON ({type(exc).__name__}: {exc})")
    if not isinstance(report, dict) or not {"rows", "build_info", "device", "date", "command"} <= report.keys():
        parser.error(f"{args.json}: not a results JSON written by python -m benchmarks (no rows, device, ...)")
    print(table(report, args.all, not args.no_reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
