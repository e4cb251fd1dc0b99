// amnets_kernels._C.SourcesSnapshot: whether a cache built from a module's tensors still matches them, checked
// in one native call with no arguments. Python's own check (read each tensor from its module's dict, then its
// id, _version and data_ptr) cost ~3 us for the 18 tensors of a 2-layer AmNets encoder, more than a cheap
// frame's arithmetic (python/amnets/encoder.py: stream() checks its cached frame engine on every call; the
// CPU engine's StreamCall, csrc/cpu/frame_engine.cpp, holds one).
// Part of the Python module only (examples/deploy builds the other sources without AMNETS_PYTHON_MODULE).
#pragma once
#ifdef AMNETS_PYTHON_MODULE
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "tensor_identity.h"

namespace amnets {

// Some writes change a weight and bump no version: in-place edits through `.data` (a counter of its own) or
// `.numpy()`, DLPack consumers, torch.optim's fused=True steps on the CPU. amnets_kernels.weights_changed()
// (called by hand after those, and after every torch.optim step by a hook: amnets_kernels/_weights.py)
// advances this epoch, and every snapshot taken before it reads as stale.
inline std::atomic<int64_t>& weights_epoch() {
  static std::atomic<int64_t> epoch{0};
  return epoch;
}

// Built from (dict, key) pairs, e.g. (module._parameters, "weight") or (module._modules, "arbitrator"): the
// object found there now must be the one found at the snapshot (a parameter or submodule replaced is seen;
// the objects are held, so that their addresses cannot be reused by others). For a tensor also its
// TensorIdentity (tensor_identity.h): the TensorImpl it wraps (torch.utils.swap_tensors, as module.to() may
// use, swaps it), its storage and data pointer (`.data = ...` re-points them) and its version (every in-place
// write bumps it: optimizer steps, load_state_dict, fill_). And the weights epoch above, for the writes no
// version records. An entry (dict, key, false) leaves its tensor's version out: the cache holds that tensor
// and follows its in-place writes itself (BlockSparseLSTM's prepared steps and their values).
class SourcesSnapshot {
 public:
  explicit SourcesSnapshot(const std::vector<pybind11::tuple>& entries)
      : epoch_(weights_epoch().load(std::memory_order_acquire)) {
    for (const pybind11::tuple& entry : entries) {
      TORCH_CHECK_VALUE(entry.size() == 2 || entry.size() == 3,
                        "SourcesSnapshot: an entry is (dict, key) or (dict, key, track_version); got ", entry.size(),
                        " items");
      // A type check, not cast<dict>(): that would make a new dict from any mapping, and the snapshot would
      // watch a copy.
      TORCH_CHECK_TYPE(pybind11::isinstance<pybind11::dict>(entry[0]), "SourcesSnapshot: an entry's first item "
                       "must be a dict; got ", Py_TYPE(entry[0].ptr())->tp_name);
      const auto dict = pybind11::reinterpret_borrow<pybind11::dict>(entry[0]);
      const pybind11::object key = entry[1];
      TORCH_CHECK_TYPE(entry.size() == 2 || PyBool_Check(entry[2].ptr()), "SourcesSnapshot: an entry's third item "
                       "(track_version) must be a bool; got ", Py_TYPE(entry[2].ptr())->tp_name);
      const bool track_version = entry.size() == 2 || entry[2].ptr() == Py_True;
      PyObject* value = PyDict_GetItemWithError(dict.ptr(), key.ptr());
      if (value == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
      TORCH_CHECK_VALUE(value != nullptr, "SourcesSnapshot: no entry ", pybind11::str(key).cast<std::string>());
      Entry e{dict, own_key(dict, key), pybind11::reinterpret_borrow<pybind11::object>(value)};
      if (THPVariable_Check(value)) e.tensor.emplace(THPVariable_Unpack(value), track_version);
      entries_.push_back(std::move(e));
    }
  }

  // Every entry holds the same object, and every tensor among them is unchanged.
  bool matches() const {
    if (cleared_ || weights_epoch().load(std::memory_order_acquire) != epoch_) return false;
    for (const Entry& e : entries_) {
      PyObject* value = PyDict_GetItemWithError(e.dict.ptr(), e.key.ptr());  // borrowed; hashes are cached
      if (value != e.object.ptr()) {
        if (value == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
        return false;
      }
      if (e.tensor && !e.tensor->matches(THPVariable_Unpack(value).unsafeGetTensorImpl())) return false;
    }
    return true;
  }

  // For Python's cycle collector (sources_snapshot.cpp): a cache in a module holding a snapshot of the module's
  // own dicts is a cycle as soon as a parameter refers back to the module (a hook's closure, an attribute).
  int traverse(visitproc visit, void* arg) const {
    for (const Entry& e : entries_) {
      Py_VISIT(e.dict.ptr());
      Py_VISIT(e.key.ptr());
      Py_VISIT(e.object.ptr());
    }
    return 0;
  }
  void clear() {  // a cleared snapshot never matches
    cleared_ = true;
    entries_.clear();
  }

 private:
  struct Entry {
    pybind11::dict dict;
    pybind11::object key, object;
    std::optional<TensorIdentity> tensor;  // none: the object is not a tensor
  };

  // The dict's own key object equal to a str `key`: a lookup with it matches by identity, with no string compare
  // (f"weight_ih_l{k}" makes a new string each time: comparing them cost ~0.1 us of the ~0.45 us check). Other
  // keys are used as given: the first key that compares equal need not be the one the lookup finds.
  static pybind11::object own_key(const pybind11::dict& dict, const pybind11::object& key) {
    if (!PyUnicode_CheckExact(key.ptr())) return key;
    PyObject *k = nullptr, *v = nullptr;
    for (Py_ssize_t pos = 0; PyDict_Next(dict.ptr(), &pos, &k, &v);) {
      if (PyUnicode_CheckExact(k) && PyUnicode_Compare(k, key.ptr()) == 0)
        return pybind11::reinterpret_borrow<pybind11::object>(k);
    }
    return key;
  }

  bool cleared_ = false;
  int64_t epoch_;
  std::vector<Entry> entries_;
};

}  // namespace amnets
#endif  // AMNETS_PYTHON_MODULE
