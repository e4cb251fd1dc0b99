#!/usr/bin/env bash
# Builds the RNN-T loss peers that benchmarks/rnnt.py compares against, from their PyPI sources, CPU only:
#   fast_rnnt 1.3 (fast-rnnt) and optimized_transducer 1.4 (optimized-transducer).
# Usage: bash benchmarks/peers.sh [PYTHON]   (default .venv/bin/python; `make peers` runs it)
# Idempotent: a peer that already imports is skipped. Their CMake projects fetch pybind11 from the
# network, so a stub dir stands in for FetchContent's download (see shared KERNEL-NOTES.md, "RNN-T peers").
set -euo pipefail
PY=${1:-.venv/bin/python}
[ -x "$PY" ] || { echo "peers.sh: no python at $PY (run make install first)" >&2; exit 2; }

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
if have fast_rnnt && have optimized_transducer; then
  echo "peers.sh: fast_rnnt and optimized_transducer already importable; nothing to do"; exit 0
fi

echo "peers.sh: pip install pybind11 cmake"
"$PY" -m pip install --quiet pybind11 cmake
# (pybind11 for the stub dir below. The builds run the `cmake` on PATH, which make install apt-installs;
# built here with CMake 3.25.)

TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/pybind11"
cat > "$TMP/pybind11/CMakeLists.txt" <<CMK
set(CMAKE_FIND_PACKAGE_TARGETS_GLOBAL ON)
find_package(pybind11 CONFIG REQUIRED PATHS $("$PY" -m pybind11 --cmakedir) NO_DEFAULT_PATH)
CMK
# torch 2.14's headers need C++20; optimized_transducer's CMakeLists forces C++14, so its standard is
# set again from a project include.
echo 'set(CMAKE_CXX_STANDARD 20)' > "$TMP/cxx20.cmake"

COMMON="-DCMAKE_BUILD_TYPE=Release -DFETCHCONTENT_SOURCE_DIR_PYBIND11=$TMP/pybind11 -DFETCHCONTENT_FULLY_DISCONNECTED=ON"
# torch's CMake config (a CUDA build of torch) stops unless it finds the CUDA toolkit and nvrtc.
# The toolkit root: the first of $CUDA_HOME, nvcc's parent dir, /usr/local/cuda with a cuda_runtime.h (nvcc on
# PATH may be a wrapper script, so its parent dir need not be the toolkit).
CUDA_ROOT=
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")" /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_ROOT=$d; break; fi
done
if [ -n "$CUDA_ROOT" ]; then
  NVRTC=$("$PY" -c 'import glob, os, site; print((glob.glob(os.path.join(site.getsitepackages()[0], "nvidia/cu*/lib/libnvrtc.so.*[0-9]")) + [""])[0])')
  COMMON="$COMMON -DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT -DCUDAToolkit_ROOT=$CUDA_ROOT"
  [ -n "$NVRTC" ] && COMMON="$COMMON -DCUDA_nvrtc_LIBRARY=$NVRTC"
  # and a fixed arch list, or it tries to run a GPU-detection program (no GPU here; the peers build CPU-only)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  echo "peers.sh: CUDA toolkit for torch's CMake config: $CUDA_ROOT${NVRTC:+, nvrtc $NVRTC}"
fi
JOBS=${JOBS:-$(nproc)}

build() {  # module, pip requirement, env assignments...
  local mod=$1 req=$2; shift 2
  if have "$mod"; then echo "peers.sh: $mod already importable; skipped"; return; fi
  echo "peers.sh: building $req (CPU only, a few minutes)"
  local t0=$SECONDS log="$TMP/$mod.log"
  if ! env "$@" "$PY" -m pip install --no-build-isolation --no-binary :all: --no-deps "$req" >"$log" 2>&1 \
      || ! have "$mod"; then
    cp "$log" "/tmp/peers-$mod.log"
    grep -iE "error|fatal|cmake error" "$log" | grep -v "^ *File " | head -n 30 >&2 || true
    echo "peers.sh: FAILED to build $req (full log: /tmp/peers-$mod.log); benchmarks will list $mod as skipped" >&2
    exit 1
  fi
  echo "peers.sh: $mod built and installed in $((SECONDS - t0)) s"
}

build fast_rnnt fast-rnnt==1.3 \
  FT_CMAKE_ARGS="$COMMON -DFT_BUILD_TESTS=OFF -DFT_WITH_CUDA=OFF -DCMAKE_CXX_STANDARD=20" FT_MAKE_ARGS="-j$JOBS"
build optimized_transducer optimized-transducer==1.4 \
  OT_CMAKE_ARGS="$COMMON -DOT_WITH_CUDA=OFF -DCMAKE_PROJECT_INCLUDE=$TMP/cxx20.cmake" OT_MAKE_ARGS="-j$JOBS"
echo "peers.sh: done"
