"""Triton faces, one module per op family (bsr.py, lowrank_lstm.py, rnnt.py), none written yet.

A module here defines its @triton.jit kernels, the launchers <op>_forward / <op>_backward with the
contract of amnets_kernels/_ops/, and AOT_CONFIGS: a list of amnets_kernels.aot.AotConfig naming every
(kernel, signature, constexprs, num_warps, num_stages) its launchers can use. `python -m
amnets_kernels.aot` compiles all of them for sm_80/sm_90 without a GPU and fails on any spill.
Kernels must run on Triton 3.6 (the GPU machines) to 3.8 (here): masked pointer loads, no
tl.make_block_ptr. Under TRITON_INTERPRET=1 bf16 is computed wrongly: cast to fp32 right after tl.load.
"""
