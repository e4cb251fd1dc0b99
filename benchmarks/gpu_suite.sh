#!/usr/bin/env bash
# On a machine with a CUDA GPU, one command: build the extension with its CUDA faces for this GPU,
# run the whole test suite on CUDA (real Triton, not the interpreter), run every benchmark, and write
# benchmarks/results/<gpu>.json/.md/.png plus <gpu>-tests.log. Uses the python3 that holds torch there
# (no network needed: nothing is installed but this package). Meant to finish inside 10 minutes on an H100.
#   OUT_DIR=dir  where results go (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_suite.sh: no CUDA GPU visible to torch; nothing to do" >&2
  exit 2
fi
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name())')
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
cap=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if m == 9 else ""))')
echo "== $gpu (sm $cap), torch $($PY -c 'import torch; print(torch.__version__)')"

echo "== build (CUDA faces for $cap)"
start=$SECONDS
AMNETS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=$(nproc) \
  $PY -m pip install --quiet --no-build-isolation --no-deps -e . || { echo "build failed" >&2; exit 1; }
echo "   built in $((SECONDS - start)) s"

echo "== tests on CUDA"
AMNETS_TEST_DEVICE=cuda $PY -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/$slug-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
$PY -m benchmarks --device cuda --name "$slug" --out "$OUT" > /dev/null
bench_rc=$?
echo "== done in $((SECONDS - start)) s: tests exit $tests_rc, benchmarks exit $bench_rc; results in $OUT/$slug.*"
exit $(( tests_rc != 0 || bench_rc != 0 ))
