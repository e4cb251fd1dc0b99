#!/usr/bin/env bash
# The test suite against the CPU extension built with a sanitizer, in a scratch copy of this checkout so that the
# normal build stays as it is:
#   bash tests/sanitize.sh address [PYTHON] [pytest arguments ...]   (make asan: out-of-bounds reads and writes,
#                                                                    use after free in csrc/)
#   bash tests/sanitize.sh thread  [PYTHON] [pytest arguments ...]   (make tsan: data races in csrc/)
# PYTHON defaults to .venv/bin/python; the tests to the CPU test files below (address) or to the ones that call
# our code from many threads (thread). About 10 minutes of build on 2 cores, then the tests at ~1.5x (address)
# or ~10x (thread) their usual time. HYPOTHESIS_PROFILE=thorough fuzzes harder. The AMX kernels run on their
# emulation here (tests that choose it), as the hardware tiles' memory accesses are not instrumented. Not part
# of `make test` (CI time).
#
# ThreadSanitizer sees only instrumented code and the synchronisation that goes through the functions it
# intercepts (pthread) or that it instruments (std::atomic in our code). libgomp is neither: every race it reports between
# OpenMP team threads (ATen's parallel regions, and ours inside an OpenMpScope) is unjudgeable, and it cannot
# follow a fork of a multithreaded process (that test fails under it). tests/tsan_reports.py sorts the reports
# and fails on any that involves neither OpenMP threads nor thread-exit TLS teardown: a race among our pool's
# workers, their callers and Python threads.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:?"usage: tests/sanitize.sh address|thread [PYTHON] [pytest arguments ...]"}
shift
case "$MODE" in
  address) LIB=libasan.so ;;
  thread) LIB=libtsan.so ;;
  *) echo "tests/sanitize.sh: the sanitizer is 'address' or 'thread'; got '$MODE'" >&2; exit 2 ;;
esac
PY=${1:-$ROOT/.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, not resolved: a venv's python is a symlink
shift || true
WORK=${SANITIZE_WORK:-/tmp/amnets-$MODE}

rm -rf "$WORK" && mkdir -p "$WORK"
# tracked and untracked-but-not-ignored files, as they are now
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK" -xf -
cd "$WORK"
CFLAGS="-fsanitize=$MODE -fno-omit-frame-pointer" LDFLAGS="-fsanitize=$MODE" AMNETS_BUILD_CUDA=0 AMNETS_DEBUG_INFO=1 MAX_JOBS=2 \
  "$PY" setup.py -q build_ext --inplace

# Python itself is not instrumented: the runtime goes in first, with libstdc++ (else ASan's C++ exception hook
# finds no __cxa_throw and aborts the first pybind11 throw). Subprocesses inherit the preload; the tests that
# run espeak-ng (the corpus, the CLI, the demo) hang under it and are left out.
export LD_PRELOAD="$(gcc -print-file-name=$LIB) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$WORK:$WORK/python" AMNETS_BUILD_CUDA=0
export TSAN_OPTIONS="report_signal_unsafe=0 halt_on_error=0 exitcode=0 log_path=$WORK/tsan-report"  # exit: pytest's; the reports: below
if [ $# -eq 0 ] && [ "$MODE" = address ]; then
  set -- tests --ignore-glob='tests/test_amnets_cli*' --ignore=tests/test_amnets_data.py \
    --ignore=tests/test_amnets_bench.py --ignore=tests/test_example.py
elif [ $# -eq 0 ]; then
  set -- tests/test_threads.py tests/test_frame_engine.py -k "thread or gil or deadlock or refused" \
    --deselect tests/test_frame_engine.py::test_thread_counts_and_a_forked_child_give_the_same_frames
fi
"$PY" -c "import amnets_kernels, sys; assert amnets_kernels.__file__.startswith('$WORK'), amnets_kernels.__file__"
if [ "$MODE" = address ]; then
  exec "$PY" -m pytest -q -p no:cacheprovider "$@"
fi
rc=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
env -u LD_PRELOAD "$PY" "$ROOT/tests/tsan_reports.py" "$WORK"/tsan-report.* || rc=$((rc ? rc : 1))
exit $rc
