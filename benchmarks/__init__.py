"""Benchmarks of amnets_kernels: `python -m benchmarks` (what `make bench` runs) and pytest-benchmark
suites (benchmarks/test_suites.py). One module per op family builds the cases."""
