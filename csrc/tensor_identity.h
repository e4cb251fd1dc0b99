// Whether a tensor still holds what a cache was built from: the same TensorImpl, storage, data pointer, size
// and version counter. The StorageImpl is pinned by a weak reference (its few bytes stay allocated, not the
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

namespace amnets {

class TensorIdentity {
 public:
  explicit TensorIdentity(const at::Tensor& t, bool track_version = true)
      : storage_pin_(t.has_storage() ? t.storage().getWeakStorageImpl()
                                     : c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>())),
        track_version_(track_version),
        now_(of(t.unsafeGetTensorImpl(), track_version)) {}

  bool matches(c10::TensorImpl* t) const { return of(t, track_version_) == now_; }
  bool matches(const at::Tensor& t) const { return matches(t.unsafeGetTensorImpl()); }

 private:
  struct Raw {
    const void* impl;
    const void* storage;
    const void* data;
    int64_t numel, version;
    bool operator==(const Raw&) const = default;
  };

  static Raw of(c10::TensorImpl* t, bool track_version) {  // not const: is_inference() is not
    if (!t->has_storage()) return {t, nullptr, nullptr, 0, -1};  // functorch's wrappers: the TensorImpl alone
    return {t, t->unsafe_storage().unsafeGetStorageImpl(), t->data(), t->numel(),
            !track_version || t->is_inference() ? -1 : static_cast<int64_t>(t->version_counter().current_version())};
  }

  c10::weak_intrusive_ptr<c10::StorageImpl> storage_pin_;
  bool track_version_;
  Raw now_;
};

}  // namespace amnets
