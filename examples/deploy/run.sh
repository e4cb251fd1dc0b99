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
