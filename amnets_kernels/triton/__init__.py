"""Triton faces, one module per op family: bsr.py, lowrank_lstm.py, rnnt.py.

Each module defines its @triton.jit kernels, the launchers <op>_forward / <op>_backward with the
contract of amnets_kernels/_ops/, and AOT_CONFIGS: a list of amnets_kernels.aot.AotConfig naming every
(kernel, signature, constexprs, num_warps, num_stages) its launchers can use. `python -m
amnets_kernels.aot` compiles all of them for sm_80/sm_90 without a GPU and fails on any spill; each
module's tests check that its launchers only pick listed configurations. Kernels run on Triton 3.6 (the
GPU machines) to 3.8 (here): masked pointer loads, no tl.make_block_ptr. Under TRITON_INTERPRET=1 bf16
is computed wrongly, so loads are cast to fp32 at once; fp32 tl.dot uses input_precision="ieee".
"""
