# From a fresh clone:  make test   (install, build, test suite, Triton AOT report, C++ deployment example)
#                      make bench  (the benchmark table on this machine's device; QUICK=1 smoke run)
#                      make peers  (optional: build fast_rnnt and optimized_transducer, rnnt_loss peers, from source)
# Both create .venv and install the pinned stack (pyproject.toml) the first time, and rebuild the
# extension when setup.py, pyproject.toml or csrc/ change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
QUICK  ?=
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: test bench peers install aot deploy asan tsan clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# espeak-ng (Debian package) synthesises the amnets speech corpus; cmake and ninja build the C++
# deployment example. torch must be importable before the extension builds (--no-build-isolation), so the
# build requirements from pyproject.toml go in first.
$(VENV)/.installed: $(PY) $(SOURCES)
	command -v espeak-ng >/dev/null && command -v cmake >/dev/null && command -v ninja >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng cmake ninja-build)
	$(PY) -m pip install --quiet $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	MAX_JOBS=2 $(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The lent GPU machines (H200, sm_90) run Triton 3.6 beside torch 2.11; CI pins 3.8. Register allocation
# differs between the two, so the AOT report also runs under 3.6 for sm_90 (3.6 sits beside the venv, on
# PYTHONPATH for that run; no GPU we get runs 3.6 on sm_80).
GPU_TRITON     := 3.6.0
GPU_TRITON_DIR := $(VENV)/triton-$(GPU_TRITON)
$(GPU_TRITON_DIR)/.installed: $(PY)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)
	touch $@

# The suite runs in TEST_JOBS processes (pytest-xdist; 0: one), then the tests marked serial alone: they time a
# thread's progress or start busy processes, which another test process on the CPU would disturb.
TEST_JOBS ?= 2

test: install $(GPU_TRITON_DIR)/.installed
	@$(PY) -m pytest -n $(TEST_JOBS) -m "not serial" && $(PY) -m pytest -m serial; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; fi; \
	  exit $$rc
	$(MAKE) --no-print-directory aot
	bash examples/deploy/run.sh $(PY)

aot: install $(GPU_TRITON_DIR)/.installed
	$(PY) -m amnets_kernels.aot
	PYTHONPATH=$(GPU_TRITON_DIR) $(PY) -m amnets_kernels.aot --arch sm_90

deploy: install
	bash examples/deploy/run.sh $(PY)

bench: install
	$(PY) -m benchmarks $(if $(QUICK),--quick)
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.frame_engine $(if $(QUICK),--quick)
	$(PY) -m benchmarks.contention $(if $(QUICK),--quick)

# Optional: the rnnt_loss peers benchmarks/rnnt.py times when importable (a few minutes of C++ builds;
# test and bench do not need them and label them "not installed" without).
peers: install
	bash benchmarks/peers.sh $(PY)

# Optional: the test suite against an AddressSanitizer build of the CPU extension (tests/sanitize.sh; ~25 minutes),
# and the threaded tests against a ThreadSanitizer build (~20 minutes; tests/tsan_reports.py judges the reports).
asan: install
	bash tests/sanitize.sh address $(PY)

tsan: install
	bash tests/sanitize.sh thread $(PY)

clean:
	rm -rf build *.egg-info amnets_kernels/_C*.so $(VENV)
