#!/usr/bin/env bash
# examples/deploy/run.sh [PYTHON]: build our native library and the C++ runner against the torch wheel's
# libtorch, export a swapped acoustic model and an AmNets streaming step to AOTInductor packages
# (examples/deploy/export.py), and run both from C++ (no Python in that process); exits non-zero unless
# the C++ outputs equal Python eager's. `make test` runs it.
set -euo pipefail
PY=${1:-python}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/build/deploy
TORCH_DIR=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
mkdir -p "$OUT"
cmake -S "$ROOT/examples/deploy" -B "$OUT/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTORCH_DIR="$TORCH_DIR" \
  -DTORCH_CXX11_ABI="$ABI" > "$OUT/cmake-configure.log"
cmake --build "$OUT/cmake"
"$PY" "$ROOT/examples/deploy/export.py" "$OUT"
RUN=("$OUT/cmake/run_deployed" "$OUT/cmake/libamnets_native.so")
"${RUN[@]}" "$OUT/acoustic.pt2" "$OUT/acoustic.input.bin" "$OUT/acoustic.expected.bin" 1,50,80
"${RUN[@]}" "$OUT/amnets_step.pt2" "$OUT/amnets_step.input.bin" "$OUT/amnets_step.expected.bin" 30,40 --stream 2,64
# Wrong SHAPEs fail with a one-line message instead of running: one whose element count is not the input
# file's (exit 2, before the package runs), and one with the file's count that is not the exported shape
# (exit 1: the package's own input check, which run_deployed turns on).
expect_failure() {  # STATUS COMMAND...
  local want=$1 status=0
  shift
  "$@" 2> "$OUT/wrong_shape.err" || status=$?
  if [ "$status" != "$want" ] || ! grep -q "^run_deployed: " "$OUT/wrong_shape.err"; then
    echo "run.sh: expected exit $want and a run_deployed: message from: $*; got exit $status:" >&2
    cat "$OUT/wrong_shape.err" >&2
    exit 1
  fi
  echo "as expected (exit $status): $(head -n 1 "$OUT/wrong_shape.err")"
}
expect_failure 2 "${RUN[@]}" "$OUT/acoustic.pt2" "$OUT/acoustic.input.bin" "$OUT/acoustic.expected.bin" 5000,50,80
expect_failure 2 "${RUN[@]}" "$OUT/acoustic.pt2" "$OUT/acoustic.input.bin" "$OUT/acoustic.expected.bin" 1,49,80
expect_failure 1 "${RUN[@]}" "$OUT/acoustic.pt2" "$OUT/acoustic.input.bin" "$OUT/acoustic.expected.bin" 1,80,50
