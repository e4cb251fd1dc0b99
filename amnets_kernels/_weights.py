"""weights_changed(): for writes to weights that PyTorch's version counters do not record.

The caches built from weights (the AmNets encoder's frame engines and per-layer streaming steps,
BlockSparseLSTM's prepared steps and split weights, all through _C.SourcesSnapshot) tell a changed weight by
its tensor, storage, data pointer, dtype, sizes, strides and version counter. Some writes bump no version: an
in-place edit through `.data` (which has a counter of its own) or `.numpy()`, a write through another tensor
over the same memory (after torch.nn.utils.vector_to_parameters the parameters' .data are views of the flat
vector: writing the vector bumps its counter, not theirs), a DLPack consumer, and torch.optim's fused=True
steps on the CPU (Adam, AdamW, SGD, Adagrad under torch 2.14). The last are caught here: a torch.optim step
with fused=True in any of its param groups ends with weights_changed() (a global step hook, registered when
amnets_kernels is imported); every other torch.optim step writes in place and bumps the counters itself
(checked for each torch.optim optimizer, foreach or not, under torch 2.14), so it leaves the caches of other
models alone. The others need one
call by hand, which also makes the op check and derive CUDA index data (crow_indices, col_indices:
csrc/pattern_cache.h) afresh.
"""

from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_post_hook

from ._backend import _C


def weights_changed() -> None:
    """Every cache built from weights before this call is rebuilt at its next use (the next stream() call,
    BlockSparseLSTM's next no-grad forward). Call it after editing weights in a way that bumps no version
    counter: `p.data.mul_(...)`, writes through `p.numpy()` or DLPack. Streamers built before keep their
    weights: make new ones. Block-sparse index tensors on CUDA edited that way are checked again too."""
    _C.weights_changed(indices=True)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if any(group.get("fused") for group in optimizer.param_groups):
        _C.weights_changed(indices=False)  # a step writes values, not patterns: the checked patterns stay


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
