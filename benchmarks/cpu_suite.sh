#!/usr/bin/env bash
# On a CPU machine kind the README has no table for yet (issue 17: the Intel Xeon with AMX and a 480 MB L3), one
# command measures everything issue 17 asks per CPU kind. Run it from a clone after `make install`:
#   bash benchmarks/cpu_suite.sh   (2-core AMD EPYC: ~5 minutes of tests, 12.5 of benchmarks; longer with a larger L3)
# Every file is named after the CPU kind (intel-xeon, amd-epyc, else the model name) and written into OUT_DIR
# (default benchmarks/results):
#   <cpu>-cpu-suite.log                        the CPU, build_info, the test suite's result, each stage's time
#   <cpu>-1-thread-bsr-regimes.{json,md,png}   bsr_linear fp32/bf16 at issue 17's shapes, dram and cache regimes
#   <cpu>-2-threads-bsr-headline.*             the README table's bsr_linear rows (4 rotated weight sets)
#   <cpu>-2-threads-lstm-headline.*            the low-rank LSTM against nn.LSTM, fp32 and bf16
#   <cpu>-2-threads-rnnt.*                     rnnt_loss and the fused joint against torchaudio (and PyTorch's joint)
#   <cpu>-{1-thread,2-threads}-frame-engine.md issue 12's targets and the H=1024 x3 encoder in both regimes
#   <cpu>-1-thread-amx-rows.md                 AMX tiles against AVX512-BF16 by row count (where the thresholds go)
#   <cpu>-2-threads-contention.md              each op's growth beside one busy process
#   <cpu>-2-threads-contention-2-hogs.md       the same beside two (heavier load: reported, no goal)
#   <cpu>-overhead.md, <cpu>-serving.md        host cost per call; streams on threads
# The test suite runs first: on an AMX CPU its "hardware" cases run the tile kernels for real (elsewhere they
# skip and only the emulation runs). Each stage has a time limit (STAGE_TIMEOUT seconds, default 900); a stage
# that fails or times out is logged and the next one runs. TESTS=0 skips the test suite; QUICK=1 runs the
# benchmarks' smoke sizes (a check of this script: its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results}
LIMIT=${STAGE_TIMEOUT:-900}
q=${QUICK:+--quick}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

model=$($PY -c 'from benchmarks.__main__ import cpu_model; print(cpu_model())') || { echo "cpu_suite.sh: $PY cannot import the benchmarks (make install first)" >&2; exit 2; }
case "${model,,}" in
  *xeon*) kind=intel-xeon ;;
  *epyc*) kind=amd-epyc ;;
  *) kind=$($PY -c 'import sys; from benchmarks.__main__ import slug; print(slug(sys.argv[1]))' "$model") ;;
esac
log="$OUT/$kind-cpu-suite.log"
exec > >(tee "$log") 2>&1
start=$SECONDS
stage() { echo; echo "== [$((SECONDS - start)) s] $*  (load average: $(cut -d" " -f1-3 /proc/loadavg))"; }
# run NAME OUTFILE CMD...: the command under the stage limit, its stdout into OUTFILE ("-": the log only).
run() {
  local name=$1 out=$2
  shift 2
  stage "$name: $*"
  if [ "$out" = "-" ]; then
    timeout "$LIMIT" "$@"
  else
    timeout "$LIMIT" "$@" > "$out.tmp" && mv "$out.tmp" "$out"
  fi
  local rc=$?
  [ "$rc" -eq 0 ] || echo "!! $name: exit $rc$([ "$rc" -eq 124 ] && echo " (timed out after $LIMIT s)")"
  [ "$out" = "-" ] || [ ! -f "$out" ] || cat "$out"
}

stage "$model -> $kind; $(nproc) cores; $(date -u +%Y-%m-%dT%H:%M:%SZ); git $(git rev-parse --short HEAD 2>/dev/null)"
lscpu | grep -E "^(Model name|Thread|Core|Socket|L1d|L2|L3|NUMA node\(s\))" || true
grep -o -w -E "avx512f|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8" /proc/cpuinfo | sort | uniq -c || true
$PY -c 'import amnets_kernels as ak, torch; print("torch", torch.__version__); print("build_info:", ak.build_info())'

if [ "${TESTS:-1}" != 0 ]; then
  run "test suite" - $PY -m pytest -q -p no:cacheprovider --timeout 600 tests
fi
run "AMX tiles by row count" "$OUT/$kind-1-thread-amx-rows.md" $PY -m benchmarks.amx_rows $q --threads 1
# QUICK=1: the smoke grid has none of the headline shapes (a --filter matching no case is an error) and no regime
# cases, so the headline stages run the whole smoke grid and the regimes stage is skipped.
if [ -n "$q" ]; then bsr_only=(); lstm_only=(); else bsr_only=(--filter "W=4096x2048 b=32"); lstm_only=(--filter "r=256 T=100"); fi
[ -n "$q" ] || run "bsr_linear regimes" - $PY -m benchmarks --ops bsr_regimes --threads 1 --name "$kind-1-thread-bsr-regimes" --out "$OUT"
run "bsr_linear headline" - $PY -m benchmarks $q --ops bsr "${bsr_only[@]}" --threads 2 --name "$kind-2-threads-bsr-headline" --out "$OUT"
run "low-rank LSTM headline" - $PY -m benchmarks $q --ops lowrank_lstm "${lstm_only[@]}" --threads 2 --name "$kind-2-threads-lstm-headline" --out "$OUT"
run "RNN-T losses" - $PY -m benchmarks $q --ops rnnt,fused_joint --threads 2 --name "$kind-2-threads-rnnt" --out "$OUT"
run "frame engine, 1 thread" "$OUT/$kind-1-thread-frame-engine.md" $PY -m benchmarks.frame_engine $q --threads 1
run "frame engine, 2 threads" "$OUT/$kind-2-threads-frame-engine.md" $PY -m benchmarks.frame_engine $q --threads 2
run "contention" "$OUT/$kind-2-threads-contention.md" $PY -m benchmarks.contention $q --threads 2
run "contention, two hogs" "$OUT/$kind-2-threads-contention-2-hogs.md" $PY -m benchmarks.contention $q --threads 2 --hogs 2
run "host cost per call" "$OUT/$kind-overhead.md" $PY -m benchmarks.overhead
run "streams on threads" "$OUT/$kind-serving.md" $PY -m benchmarks.serving
stage "done"
