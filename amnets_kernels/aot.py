"""Ahead-of-time compile every Triton kernel configuration for a GPU, on a machine without one.

    python -m amnets_kernels.aot [--arch sm_80] [--arch sm_90] [--only NAME_SUBSTRING] [--jobs N]

Prints one line per kernel configuration and arch: registers, shared memory, stack, spill bytes.
Exits non-zero if any configuration fails to compile or spills. Configurations come from the
AOT_CONFIGS list of each module in amnets_kernels/triton/. The report names the Triton that compiled:
register allocation differs between releases, so `make test` runs it under CI's Triton and again under
the lent GPU machines' (Makefile, GPU_TRITON).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotConfig:
    """One compiled variant of a kernel: what its launcher passes as signature and constexprs."""

    name: str
    kernel: object  # a triton.JITFunction
    signature: dict  # argument name -> "*fp32", "i32", ..., or "constexpr"
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class Report:
    name: str
    arch: str
    registers: int | None = None
    shared_bytes: int | None = None
    stack_bytes: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_stores == 0 and self.spill_loads == 0

    def line(self) -> str:
        if self.error is not None:
            return f"FAIL  {self.arch:7s} {self.name}: {self.error}"
        status = "ok  " if self.ok else "SPILL"
        return (f"{status}  {self.arch:7s} {self.name}: {self.registers} registers, {self.shared_bytes} B shared, "
                f"{self.stack_bytes} B stack, spills {self.spill_stores} B stored / {self.spill_loads} B loaded")


def registered_configs(extra_modules=()) -> list[AotConfig]:
    """AOT_CONFIGS of every module in amnets_kernels/triton/ (and of `extra_modules`, by name)."""
    from . import triton as faces

    names = [f"{faces.__name__}.{m.name}" for m in pkgutil.iter_modules(faces.__path__)] + list(extra_modules)
    return [config for name in names for config in getattr(importlib.import_module(name), "AOT_CONFIGS", [])]


def _ptxas_binaries() -> list[str]:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # The wheel's own ptxas understands the PTX version Triton emits; the system one may not.
    return [p for name in ("ptxas", "ptxas-blackwell") for p in glob.glob(os.path.join(folder, name))]


def _parse_ptxas(text: str, report: Report) -> None:
    def number(pattern):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else None

    report.registers = number(r"Used (\d+) registers")
    report.stack_bytes = number(r"(\d+) bytes stack frame")
    report.spill_stores = number(r"(\d+) bytes spill stores")
    report.spill_loads = number(r"(\d+) bytes spill loads")
    if report.registers is None or report.spill_stores is None:
        report.error = "could not read registers/spills from ptxas output: " + text.strip()[-300:]


def compile_config(config: AotConfig, arch: str) -> Report:
    """Compile one configuration for `arch` ("sm_80", "sm_90") and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    report = Report(config.name, arch)
    capability = int(arch.removeprefix("sm_").rstrip("a"))
    try:
        source = triton.compiler.ASTSource(fn=config.kernel, signature=config.signature,
                                           constexprs=config.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # a compile error is a result to report, not a crash of the report
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return report
    report.shared_bytes = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    gpu = target.group(1) if target else arch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        outputs = []
        for ptxas in _ptxas_binaries():
            done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.o")],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                _parse_ptxas(done.stdout + done.stderr, report)
                return report
            outputs.append(f"{os.path.basename(ptxas)}: {done.stderr.strip()[-300:]}")
    report.error = "ptxas failed: " + (" | ".join(outputs) if outputs else "no ptxas in the triton wheel")
    return report


_JOBS: list = []  # (config, arch) of this run, inherited by the forked workers


def _compile_job(index: int) -> Report:
    return compile_config(*_JOBS[index])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amnets_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=["sm_80", "sm_90"],
                        help="target arch (repeatable; default: both)")
    parser.add_argument("--only", default="", help="compile only configurations whose name contains this")
    parser.add_argument("--module", action="append", default=[],
                        help="also compile the AOT_CONFIGS of this importable module (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="configurations compiled at once (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"argument --jobs: must be >= 1; got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("amnets_kernels.aot: TRITON_INTERPRET=1 turns kernels into interpreted functions, which cannot "
              "be compiled; run without it", file=sys.stderr)
        return 2
    archs = args.arch or ["sm_80", "sm_90"]
    try:
        registered = registered_configs(args.module)
    except ImportError as exc:
        parser.error(f"argument --module: {exc}")
    configs = [c for c in registered if args.only in c.name]
    if args.only and registered and not configs:  # a typo must not pass as a clean report
        parser.error(f"argument --only: no configuration name contains {args.only!r} ({len(registered)} registered)")
    if not configs:
        print("amnets_kernels.aot: no Triton kernel configurations are registered (no AOT_CONFIGS in "
              "amnets_kernels/triton/): nothing was compiled, so nothing is verified yet.")
        return 0
    import triton

    _JOBS[:] = [(c, arch) for c in configs for arch in archs]
    if args.jobs > 1:
        # fork: the workers inherit the kernels (JITFunctions do not pickle); each compile is its own job
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(_JOBS))) as pool:
            reports = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    else:
        reports = [_compile_job(i) for i in range(len(_JOBS))]
    for report in reports:
        print(report.line())
    bad = [r for r in reports if not r.ok]
    print(f"amnets_kernels.aot (triton {triton.__version__}): {len(reports) - len(bad)}/{len(reports)} "
          "configurations compiled without spills" + (f"; {len(bad)} failed" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
