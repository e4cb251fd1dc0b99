// What is derived from a block-sparse pattern (crow_indices, col_indices) once and reused while the pattern
// does not change: the check of index data on the GPU (reading it is a device sync) and the column-major
// order the CUDA backward needs. An entry holds until either index tensor is freed, replaced, re-pointed
// (`.data = ...`) or changed in place (its version counter moves: tensor_identity.h), or until forget_all()
// (amnets_kernels.weights_changed()). An in-place edit that moves no version counter (through .data,
// .numpy()) is not seen before that call; inference tensors, which have no counter, are never cached.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace amnets::pattern {

// The tensors `build` derives from (crow, col) for `what` and `shape` (the sizes it also depends on),
// built on the first call and returned from the cache afterwards. A few patterns per kind are kept
// (a model has one per layer; the oldest entry goes first).
std::vector<at::Tensor> derived(const char* what, const at::Tensor& crow, const at::Tensor& col, const std::vector<int64_t>& shape,
                                const std::function<std::vector<at::Tensor>()>& build);

// Drops every entry: the next call of each pattern builds (and checks) again.
void forget_all();

}  // namespace amnets::pattern
