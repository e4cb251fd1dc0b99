#!/usr/bin/env bash
# make asan: the test suite against the CPU extension built with AddressSanitizer (out-of-bounds reads and writes,
# use after free in csrc/), in a scratch copy of this checkout so that the normal build stays as it is.
#   bash tests/asan.sh [PYTHON] [pytest arguments ...]     (default: .venv/bin/python, the CPU test files below)
# About 10 minutes of build on 2 cores, then the tests at ~1.5x their usual time. HYPOTHESIS_PROFILE=thorough
# fuzzes harder. The AMX kernels run on their emulation here (tests that choose it), as the hardware tiles'
# memory reads are not instrumented. Not part of `make test` (CI time).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, not resolved: a venv's python is a symlink
shift || true
WORK=${ASAN_WORK:-/tmp/amnets-asan}

rm -rf "$WORK" && mkdir -p "$WORK"
# tracked and untracked-but-not-ignored files, as they are now
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK" -xf -
cd "$WORK"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" AMNETS_BUILD_CUDA=0 MAX_JOBS=2 \
  "$PY" setup.py -q build_ext --inplace

# Python itself is not instrumented: the runtime goes in first, with libstdc++ (else ASan's C++ exception hook
# finds no __cxa_throw and aborts the first pybind11 throw). Subprocesses inherit the preload; the tests that
# run espeak-ng (the corpus, the CLI, the demo) hang under it and are left out.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$WORK:$WORK/python" AMNETS_BUILD_CUDA=0
if [ $# -eq 0 ]; then
  set -- tests --ignore-glob='tests/test_amnets_cli*' --ignore=tests/test_amnets_data.py \
    --ignore=tests/test_amnets_bench.py --ignore=tests/test_example.py
fi
"$PY" -c "import amnets_kernels, sys; assert amnets_kernels.__file__.startswith('$WORK'), amnets_kernels.__file__"
"$PY" -m pytest -q -p no:cacheprovider "$@"
