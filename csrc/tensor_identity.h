// Whether a tensor still holds what a cache was built from: the same TensorImpl, storage, data pointer, dtype,
// sizes, strides and version counter (`.data = w.transpose(1, 2)` or `.data = w.view(torch.float16)` keeps the
// rest). The StorageImpl is pinned by a weak reference (its few bytes stay allocated, not the
// data), so no other storage can take its address while the identity lives: `param.data = new` keeps the
// parameter's TensorImpl and version, and the new buffer may sit exactly where the freed one was (a
// perturb-evaluate-restore loop over the weights), which the data pointer alone would miss. (The TensorImpl is
// not pinned: torch.utils.swap_tensors, as module.to() may use, refuses a tensor with weak references. Another
// TensorImpl at a freed one's address that matches the rest reads the same bytes.)
// Inference tensors keep no version: theirs reads -1, and their in-place edits (only possible inside
// torch.inference_mode()) are not seen. Writes that move no version (in place through `.data`, `.numpy()`) are
// the callers' weights epoch's business (amnets_kernels.weights_changed()).
// With track_version false the version is left out: for a cache that holds the tensor itself and so follows
// its in-place writes (a prepared step reading the values an optimizer updates), only a re-point matters.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace amnets {

class TensorIdentity {
 public:
  explicit TensorIdentity(const at::Tensor& t, bool track_version = true)
      : storage_pin_(t.has_storage() ? t.storage().getWeakStorageImpl()
                                     : c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>())),
        track_version_(track_version),
        now_(of(t.unsafeGetTensorImpl(), track_version)),
        shaped_(has_shape(t.unsafeGetTensorImpl())) {
    if (shaped_) {
      sizes_ = t.sizes().vec();
      strides_ = t.strides().vec();
    }
  }

  // The same TensorImpl (compared first) keeps its layout and symbolic-ness: shaped_ holds for it still.
  bool matches(c10::TensorImpl* t) const {
    return of(t, track_version_) == now_ && (!shaped_ || (t->sizes().equals(sizes_) && t->strides().equals(strides_)));
  }
  bool matches(const at::Tensor& t) const { return matches(t.unsafeGetTensorImpl()); }

 private:
  struct Raw {
    const void* impl;
    const void* storage;
    const void* data;
    int64_t numel, version;
    c10::ScalarType dtype;
    bool operator==(const Raw&) const = default;
  };

  static Raw of(c10::TensorImpl* t, bool track_version) {  // not const: is_inference() is not
    if (!t->has_storage()) return {t, nullptr, nullptr, 0, -1, c10::ScalarType::Undefined};  // functorch's wrappers
    return {t, t->unsafe_storage().unsafeGetStorageImpl(), t->data(), t->numel(),
            !track_version || t->is_inference() ? -1 : static_cast<int64_t>(t->version_counter().current_version()),
            t->dtype().toScalarType()};
  }

  // Concrete strided sizes: not a fake tensor's symbolic ones (tracing), nor a sparse layout's (no strides).
  static bool has_shape(c10::TensorImpl* t) {
    return t->has_storage() && t->layout() == c10::kStrided && !t->has_symbolic_sizes_strides();
  }

  c10::weak_intrusive_ptr<c10::StorageImpl> storage_pin_;
  bool track_version_;
  Raw now_;
  bool shaped_;
  std::vector<int64_t> sizes_, strides_;
};

}  // namespace amnets
