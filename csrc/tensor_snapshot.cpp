// amnets_kernels._C.TensorSnapshot: whether a cache built from some tensors still matches them, checked in
// one native call. Python's own check (id, _version and data_ptr per tensor) cost ~3 us for the 18 tensors of
// a 2-layer AmNets encoder, more than a cheap frame's arithmetic (python/amnets/encoder.py's stream()).
// Part of the Python module only (examples/deploy builds the other sources without AMNETS_PYTHON_MODULE).
#ifdef AMNETS_PYTHON_MODULE
#include <torch/extension.h>

#include <vector>

namespace amnets {
namespace {

// For each tensor: the Python object (held, so that its address cannot be reused by another), the TensorImpl
// it wraps (torch.utils.swap_tensors, as module.to() may use, swaps it), the data pointer (`.data = ...`
// re-points it) and the version (every in-place write bumps it: optimizer steps, load_state_dict, fill_).
// Inference tensors keep no version: theirs is -1, and in-place edits of them (only possible inside
// torch.inference_mode()) are not seen.
class TensorSnapshot {
 public:
  explicit TensorSnapshot(const pybind11::tuple& tensors) {
    for (const pybind11::handle& item : tensors) {
      c10::TensorImpl* impl = unpack(item);
      entries_.push_back({pybind11::reinterpret_borrow<pybind11::object>(item), impl, impl->data(), version(impl)});
    }
  }

  // The same tensors, in the same order, each unchanged since the snapshot.
  bool matches(const pybind11::tuple& tensors) const {
    if (tensors.size() != entries_.size()) return false;
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      PyObject* item = PyTuple_GET_ITEM(tensors.ptr(), static_cast<Py_ssize_t>(i));
      if (item != e.object.ptr()) return false;
      c10::TensorImpl* impl = unpack(item);
      if (impl != e.impl || impl->data() != e.data || version(impl) != e.version) return false;
    }
    return true;
  }

 private:
  struct Entry {
    pybind11::object object;
    c10::TensorImpl* impl;
    const void* data;
    int64_t version;
  };

  static c10::TensorImpl* unpack(pybind11::handle item) {
    TORCH_CHECK_TYPE(THPVariable_Check(item.ptr()), "TensorSnapshot: every item must be a tensor; got ",
                     Py_TYPE(item.ptr())->tp_name);
    return THPVariable_Unpack(item.ptr()).unsafeGetTensorImpl();
  }

  static int64_t version(c10::TensorImpl* impl) {
    return impl->is_inference() ? -1 : static_cast<int64_t>(impl->version_counter().current_version());
  }

  std::vector<Entry> entries_;
};

}  // namespace

void bind_tensor_snapshot(pybind11::module_& m) {
  pybind11::class_<TensorSnapshot>(m, "TensorSnapshot")
      .def(pybind11::init<const pybind11::tuple&>())
      .def("matches", &TensorSnapshot::matches);
}

}  // namespace amnets
#endif  // AMNETS_PYTHON_MODULE
